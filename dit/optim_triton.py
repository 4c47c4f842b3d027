"""The Triton kernel of ``dit.optim.AdamWEMA``: AdamW's update and the weight EMA in one pass (imported only when it
runs: this module needs Triton). Its table rows and blocks are described in ``dit/optim.py``."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _update_block(b, table_ptr, block_tensor_ptr, block_index_ptr, found_inf_ptr, grad_scale_ptr, hyper_ptr,
                  betas_ptr, eps, norm_ptr,
                  HAS_FOUND_INF: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_EMA: tl.constexpr,
                  COPY_DTYPE: tl.constexpr, ALIGNED: tl.constexpr, GRAD_NORM: tl.constexpr,
                  FIELDS: tl.constexpr, BLOCK: tl.constexpr):
    # Block b of the update: BLOCK elements of one tensor (the tables of AdamWEMA._segment_blocks)
    row = table_ptr + tl.load(block_tensor_ptr + b).to(tl.int64) * FIELDS  # this block's tensor
    p_ptr = tl.load(row + 0).to(tl.pointer_type(tl.float32))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(tl.float32))
    m_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32))
    e_ptr = tl.load(row + 4).to(tl.pointer_type(tl.float32))
    s_ptr = tl.load(row + 5).to(tl.pointer_type(tl.float32))
    n = tl.load(row + 6)
    n_adam = n * tl.load(row + 7)  # has_grad: 0 or 1
    if HAS_FOUND_INF:  # a skipped step reads and writes nothing
        skip = tl.load(found_inf_ptr) != 0.0
        n = tl.where(skip, 0, n)
        n_adam = tl.where(skip, 0, n_adam)
    if ALIGNED:  # checked on the host: 16-byte addresses, sizes in whole 4-float vectors -> 128-bit accesses
        n = tl.multiple_of(n, 4)
        n_adam = tl.multiple_of(n_adam, 4)
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        v_ptr = tl.multiple_of(v_ptr, 16)
        e_ptr = tl.multiple_of(e_ptr, 16)
    offs = tl.load(block_index_ptr + b).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = offs < n
    adam = offs < n_adam
    p = tl.load(p_ptr + offs, mask=live, other=0.0)
    g = tl.load(g_ptr + offs, mask=adam, other=0.0)
    if HAS_GRAD_SCALE:
        g = g / tl.load(grad_scale_ptr)
    if GRAD_NORM:  # this block's sum of squared gradients; a non-finite element keeps its state (see launch)
        tl.store(norm_ptr + b, tl.sum(g * g, axis=0))
        # Kept by selecting the old values, not by masking the stores: a mask that is not uniform over each
        # 4-float vector turns every 128-bit load and store into four 32-bit ones (run 29: 575 vs 585 img/s).
        finite = tl.abs(g) <= 3.4028234663852886e38  # False for inf and NaN
    m = tl.load(m_ptr + offs, mask=adam, other=0.0)
    v = tl.load(v_ptr + offs, mask=adam, other=0.0)
    step = tl.load(s_ptr)  # already incremented for this update
    # Read from the device, not passed as arguments: a CUDA graph of the step replays this launch with the
    # learning rate and EMA weight of each step (AdamWEMA.set_hyperparameters writes them before the replay).
    lr = tl.load(hyper_ptr)
    wd_factor = tl.load(hyper_ptr + 1)  # 1 - lr * weight_decay
    ema_w = tl.load(hyper_ptr + 2)
    # The betas rounded to float32 (0.999 -> 0.99900001) for the moments, and the log2 of those same values in
    # float64 for the bias corrections: 1 - 0.999^t cancels all but the last bits of beta2^t, so float32 there
    # (exp2.approx, 2e-7 relative error) put the first steps' updates up to 1e-4 off torch's, and the exact 0.999
    # beside the float32 moments 7e-6 (run 27). One value for both: v / (1 - beta2^1) = g^2 exactly at step 1.
    beta1 = tl.load(betas_ptr).to(tl.float32)
    beta2 = tl.load(betas_ptr + 1).to(tl.float32)
    t = step.to(tl.float64)
    bc1 = (1.0 - tl.exp2(t * tl.load(betas_ptr + 2))).to(tl.float32)  # 1 - beta1^t
    bc2_sqrt = tl.sqrt((1.0 - tl.exp2(t * tl.load(betas_ptr + 3))).to(tl.float32))  # sqrt(1 - beta2^t)
    # AdamW (Loshchilov & Hutter 2019, Algorithm 2) in torch's form: decoupled decay, then the Adam step
    m_new = beta1 * m + (1.0 - beta1) * g
    v_new = beta2 * v + (1.0 - beta2) * g * g
    p_new = p * wd_factor - (lr / bc1) * m_new / (tl.sqrt(v_new) / bc2_sqrt + eps)
    if GRAD_NORM:
        m_new = tl.where(finite, m_new, m)
        v_new = tl.where(finite, v_new, v)
        p_new = tl.where(finite, p_new, p)
    p_new = tl.where(adam, p_new, p)  # parameters without a gradient keep their value (and still enter the EMA)
    m, v = m_new, v_new
    tl.store(p_ptr + offs, p_new, mask=adam)
    tl.store(m_ptr + offs, m, mask=adam)
    tl.store(v_ptr + offs, v, mask=adam)
    if COPY_DTYPE is not None:  # the parameter's copy in the compute dtype (0: this parameter keeps none)
        c_addr = tl.load(row + 8)
        c_ptr = c_addr.to(tl.pointer_type(COPY_DTYPE))
        if ALIGNED:
            c_ptr = tl.multiple_of(c_ptr, 16)
        tl.store(c_ptr + offs, p_new.to(COPY_DTYPE), mask=adam & (c_addr != 0))
    if HAS_EMA:
        e = tl.load(e_ptr + offs, mask=live, other=0.0)
        # torch.lerp's two forms (exact at both ends): e + w (p - e) for w < 0.5, p - (p - e)(1 - w) otherwise
        e_new = tl.where(ema_w < 0.5, e + ema_w * (p_new - e), p_new - (p_new - e) * (1.0 - ema_w))
        if GRAD_NORM:  # nor does its EMA move
            e = tl.where(finite, e_new, e)
        else:
            e = e_new
        tl.store(e_ptr + offs, e, mask=live)

@triton.jit(do_not_specialize=["n_blocks"])  # read only by the persistent form: no variants per value
def dit_adamw_ema(table_ptr, block_tensor_ptr, block_index_ptr, found_inf_ptr, grad_scale_ptr, hyper_ptr,
                  betas_ptr, eps, norm_ptr, n_blocks,
                  HAS_FOUND_INF: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_EMA: tl.constexpr,
                  COPY_DTYPE: tl.constexpr, ALIGNED: tl.constexpr, GRAD_NORM: tl.constexpr,
                  FIELDS: tl.constexpr, BLOCK: tl.constexpr, PERSISTENT: tl.constexpr):
    # One program per block; PERSISTENT: fewer programs than blocks, each taking every num_programs-th block
    # (AdamWEMA.launch_bucket's max_ctas: the update then holds a bounded share of the SMs at any time)
    if PERSISTENT:
        for b in tl.range(tl.program_id(0), n_blocks, tl.num_programs(0)):
            _update_block(b, table_ptr, block_tensor_ptr, block_index_ptr, found_inf_ptr, grad_scale_ptr,
                          hyper_ptr, betas_ptr, eps, norm_ptr, HAS_FOUND_INF, HAS_GRAD_SCALE, HAS_EMA, COPY_DTYPE,
                          ALIGNED, GRAD_NORM, FIELDS, BLOCK)
    else:
        _update_block(tl.program_id(0), table_ptr, block_tensor_ptr, block_index_ptr, found_inf_ptr,
                      grad_scale_ptr, hyper_ptr, betas_ptr, eps, norm_ptr, HAS_FOUND_INF, HAS_GRAD_SCALE, HAS_EMA,
                      COPY_DTYPE, ALIGNED, GRAD_NORM, FIELDS, BLOCK)
