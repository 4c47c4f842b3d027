"""The benchmark harness (tools/benchmark.py) on CPU: plumbing, report and the sampling-budget arithmetic."""

import math

import pytest
import torch

from dit.benchmark import Result, kernel_table, markdown_table, run_benchmarks, sampling_budget
from dit.utils.profiling import kernel_category

TINY_UNET = {"model_channels": 32, "channel_mult": (1, 2, 2, 2), "num_res_blocks": 1}  # UNet-S, narrow


def test_sampling_budget_arithmetic():
    b = sampling_budget(gflops=237.2, img_s_fwd=1899.0, ceiling_tflops=786.0)
    assert b["forward_calls"] == 50_000 * 250 * 2  # classifier-free guidance doubles every call
    assert b["gpu_hours"] == pytest.approx(25e6 / 1899 / 3600)
    assert b["floor_gpu_hours"] == pytest.approx(25e6 * 237.2e9 / 786e12 / 3600)
    assert sampling_budget(1.0, 10.0, 1.0, cfg=False)["forward_calls"] == 50_000 * 250


def test_run_benchmarks_on_tiny_models(tmp_path):
    tiny = {"input_size": 8, "depth": 1, "hidden_size": 32, "num_heads": 2}
    env, results = run_benchmarks(["DiT-S/4"], ["ref-tf32", "eager-bf16"], train_batch=2, fwd_batch=2, iters=1,
                                  warmup=0, overrides=tiny, json_out=tmp_path / "r.json")
    assert env["matmul_tflops"] > 0 and (tmp_path / "r.json").exists()
    assert [r.variant for r in results] == ["ref-tf32", "eager-bf16"]
    for r in results:
        assert r.train_img_s > 0 and r.fwd_img_s > 0 and r.gflops > 0
        assert 0 <= r.rel_err < 5e-2  # bf16 autocast vs fp32 on the same (randomised) weights
    assert results[0].rel_err < 1e-5  # fp32 path on CPU: same numbers as the reference
    table = markdown_table(results)
    assert table.count("| DiT-S/4 |") == 2 and "1.00" in table  # the baseline row's ratio
    with pytest.raises(ValueError, match="unknown variant"):
        run_benchmarks(["DiT-S/4"], ["turbo"], overrides=tiny)


def test_fp16_autocast_measures_about_eight_times_smaller_errors_than_bf16(tmp_path):
    """amp="fp16" (tools/benchmark.py --amp-dtype fp16) runs the variants under fp16 autocast: fp16 keeps 3
    more mantissa bits than bf16, so the output's error against fp32 falls by about 8x (the UNets' bf16 error is over
    the 1e-2 bound of issue #7, docs/benchmarks.md); the report marks the rows."""
    tiny = {"input_size": 8, **TINY_UNET}
    errs = {}
    for amp in ("bf16", "fp16"):
        _, (r,) = run_benchmarks(["UNet-S"], ["eager-bf16"], train_batch=2, fwd_batch=2, iters=1, warmup=0,
                                 overrides=tiny, amp=amp)
        errs[r.amp] = r.rel_err
        assert r.train_img_s > 0
    assert 0 < errs["fp16"] < errs["bf16"] / 3, errs
    row = Result(model="UNet-S", variant="fast", params_m=1.0, gflops=1.0, amp="fp16")
    assert "| UNet-S | fast (fp16) |" in markdown_table([row])


def test_variants_set_model_options_bf16_residual_unfused_gelu_and_fused_training(monkeypatch):
    import dit.models.cublaslt
    from dit.benchmark import _prepare
    from dit.models.layers import Mlp

    tiny = {"input_size": 8, "depth": 1, "hidden_size": 32, "num_heads": 2}
    model, _, autocast = _prepare("DiT-S/4", "fast-bf16r", torch.device("cpu"), tiny)
    assert model.low_precision_residual and autocast
    assert not _prepare("DiT-S/4", "fast-cg", torch.device("cpu"), tiny)[0].low_precision_residual
    with monkeypatch.context() as m:  # the trainer's stack (CUDA's GELU epilogues, on the CPU as their reference)
        m.setattr(dit.models.cublaslt, "gelu_epilogues_available", lambda device: True)
        cwr = _prepare("DiT-S/4", "fast-cwr", torch.device("cpu"), tiny)[0]
    assert cwr.low_precision_residual and cwr.fused_training and cwr.blocks[0].attn.fused_attention
    with pytest.raises(ValueError, match="fast-bf16r: UNet-S has no low-precision residual option"):
        _prepare("UNet-S", "fast-bf16r", torch.device("cpu"), {})
    # the GELU-epilogue ablation: every transformer MLP back on the two-kernel path, the default keeps the fused one
    mlps = lambda m: [x for x in m.modules() if isinstance(x, Mlp)]  # noqa: E731
    assert all(not m.fused_inference for m in mlps(_prepare("DiT-S/4", "fast-unfused-gelu", torch.device("cpu"),
                                                            tiny)[0]))
    assert all(m.fused_inference for m in mlps(model)) and mlps(model)
    assert _prepare("DiT-S/4", "fast-lnk", torch.device("cpu"), tiny)[0].fused_training and not model.fused_training
    with pytest.raises(ValueError, match="fast-lnk: UNet-S has no fused training forward"):
        _prepare("UNet-S", "fast-lnk", torch.device("cpu"), {})


def test_variants_fp8_and_multi_kernel():
    from dit.benchmark import _prepare, compile_settings
    from dit.models.fp8 import Float8Linear

    tiny = {"input_size": 8, "depth": 1, "hidden_size": 32, "num_heads": 2}
    fp8 = lambda m: [x for x in m.modules() if isinstance(x, Float8Linear)]  # noqa: E731
    dynamic = fp8(_prepare("DiT-S/4", "fast-fp8", torch.device("cpu"), tiny)[0])
    static = fp8(_prepare("DiT-S/4", "fast-fp8s", torch.device("cpu"), tiny)[0])
    assert len(dynamic) == len(static) == 4  # qkv, proj, fc1, fc2 of the one block
    assert all(m.input_scale is None for m in dynamic)  # fast-fp8: dynamic scales
    assert all(m.input_scale > 0 and m.weight8 is not None for m in static)  # fast-fp8s: calibrated
    assert not fp8(_prepare("DiT-S/4", "fast-cg", torch.device("cpu"), tiny)[0])
    with pytest.raises(ValueError, match="fast-fp8: UNet-S has no DiT block linears"):
        _prepare("UNet-S", "fast-fp8", torch.device("cpu"), {})
    opts = compile_settings("fast-mk", torch.device("cuda"), training=True)["options"]
    assert opts["triton.multi_kernel"] == 1 and opts["triton.cudagraphs"]
    # the ablations of run 7: the plain FP8 block forward, promoted accumulation
    unfused = _prepare("DiT-S/4", "fast-fp8s-unfused", torch.device("cpu"), tiny)[0]
    assert not unfused.fused_inference and all(m.input_scale > 0 for m in fp8(unfused))
    assert not any(m.fast_accum for m in fp8(_prepare("DiT-S/4", "fast-fp8s-promoted", torch.device("cpu"), tiny)[0]))
    assert all(m.fast_accum for m in static)
    # cuDNN autotuning is set by fast-bm only, and reset by every other variant
    try:
        _prepare("DiT-S/4", "fast-bm", torch.device("cpu"), tiny)
        assert torch.backends.cudnn.benchmark
        _prepare("DiT-S/4", "fast-cg", torch.device("cpu"), tiny)
        assert not torch.backends.cudnn.benchmark
    finally:
        torch.backends.cudnn.benchmark = False


def test_variants_moment_norm_and_channels_last_for_unets():
    from dit.benchmark import _prepare
    from dit.models.unet import ResBlock

    tiny = TINY_UNET
    blocks = lambda m: [b for b in m.modules() if isinstance(b, ResBlock)]  # noqa: E731
    try:
        gn = _prepare("UNet-S", "fast-sgclgn", torch.device("cpu"), tiny)[0]
        assert gn.moment_norm is True and all(b.moment_norm is True for b in blocks(gn)) and blocks(gn)
        assert gn.out_conv.weight.is_contiguous(memory_format=torch.channels_last) and torch.backends.cudnn.benchmark
        gk = _prepare("UNet-S", "fast-sgclgk", torch.device("cpu"), tiny)[0]
        assert all(b.moment_norm == "kernels" for b in blocks(gk)) and torch.backends.cudnn.benchmark
        assert gk.out_conv.weight.is_contiguous(memory_format=torch.channels_last)
        nchw = _prepare("UNet-S", "fast-sggn", torch.device("cpu"), tiny)[0]
        assert nchw.moment_norm and nchw.out_conv.weight.is_contiguous()
        assert not any(b.moment_norm for b in blocks(_prepare("UNet-S", "fast-sgclbm", torch.device("cpu"), tiny)[0]))
        with pytest.raises(ValueError, match="fast-sgclgn: DiT-S/4 has no GroupNorm"):
            _prepare("DiT-S/4", "fast-sgclgn", torch.device("cpu"), {"input_size": 8, "depth": 1, "hidden_size": 32,
                                                                       "num_heads": 2})
    finally:
        torch.backends.cudnn.benchmark = False


def test_step_ops_time_every_operation_on_cpu():
    from dit.benchmark import bench_step_ops

    tiny = {"input_size": 8, "depth": 1, "hidden_size": 32, "num_heads": 2}
    ms = bench_step_ops("DiT-S/4", device=torch.device("cpu"), warmup=0, iters=1, mlp_rows=2, overrides=tiny)
    assert len(ms) == 9 and all(v > 0 for v in ms.values())  # the one-kernel AdamW + EMA row is CUDA-only
    assert "mlp: fc1 GEMM + bias + GELU epilogue (sampling)" in ms
    assert len(bench_step_ops("UNet-S", device=torch.device("cpu"), warmup=0, iters=1,
                              overrides=TINY_UNET)) == 6  # no transformer MLP


def test_kernel_categories_and_table():
    # Kernel names as the profiler reports them on an H100 (cuBLAS, flash attention, Inductor, fused AdamW).
    assert kernel_category("nvjet_hsh_256x128_64x4_2x1_v_bz_coopA_NNT") == "gemm/conv"
    assert kernel_category("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64") == "gemm/conv"
    assert kernel_category("triton_tem_fused_addmm_gelu_3") == "gemm/conv"  # max-autotune's Triton GEMM template
    assert kernel_category("sm90_xmma_dgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc") == "gemm/conv"
    assert kernel_category("void cutlass__5x_cudnn::Kernel<cutlass_tensorop_bf16_s16816dgrad_optimized>") == "gemm/conv"
    assert kernel_category("void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16>") == "layout transposes"
    assert kernel_category("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<96, 128>>") == "attention"
    assert kernel_category("cudnn_generated_fort_native_sdpa_sm90_flash_fprop") == "attention"
    assert kernel_category("triton_dit_attn_bwd_dkdv") == "attention"  # ours, in Triton (dit/models/attention_triton.py)
    assert kernel_category("triton_per_fused_native_layer_norm_add_mul_12") == "fused elementwise/norm (Triton)"
    assert kernel_category("void at::native::(anonymous namespace)::fused_adamw_kernel") == "optimizer"
    assert kernel_category("something_else") == "other"
    r = Result(model="DiT-XL/2", variant="fast", params_m=675.0, gflops=237.0,
               train_kernels_ms={"gemm/conv": 70.0, "attention": 8.0, "idle": 2.0, "wall": 80.0})
    table = kernel_table([r, Result(model="DiT-S/2", variant="fast", params_m=33.0, gflops=6.0)])
    lines = table.splitlines()
    assert len(lines) == 3  # header, rule, one profiled row (the unprofiled result is left out)
    assert lines[2].startswith("| DiT-XL/2 | fast | 80.0 | 8.0 | 70.0 |") and lines[2].endswith("| 0.0 | 0.0 | 2.0 |")
    assert kernel_table([]) == ""


def test_sampling_plan_arithmetic():
    from dit.benchmark import SamplingResult, sampling_plan

    r = SamplingResult(model="m", variant="v", batch=100, guided_step_s=0.2, cond_step_s=0.1, decode_img_s=500.0)
    p = sampling_plan(r, n=1000, steps=10, guided_fraction=0.3)
    assert p["sampling_gpu_hours"] == pytest.approx(10 * 10 * (0.3 * 0.2 + 0.7 * 0.1) / 3600)  # batches x steps
    assert p["decode_gpu_hours"] == pytest.approx(1000 / 500 / 3600)
    assert p["gpu_hours"] == pytest.approx(p["sampling_gpu_hours"] + p["decode_gpu_hours"])
    assert p["guided_steps"] == 3
    full = sampling_plan(r, n=1000, steps=10)
    assert full["sampling_gpu_hours"] == pytest.approx(10 * 10 * 0.2 / 3600)
    with pytest.raises(ValueError, match="guided_fraction"):
        sampling_plan(r, guided_fraction=1.5)


def test_bench_sampling_runs_the_sampler_on_cpu(tmp_path):
    import torch

    from dit.benchmark import bench_sampling, plot_sampling, sampling_plan

    tiny = {"input_size": 8, "depth": 1, "hidden_size": 32, "num_heads": 2}
    r = bench_sampling("DiT-S/4", "eager-bf16", device=torch.device("cpu"), batch=2, steps=2, overrides=tiny,
                       repeats=1)
    assert r.guided_step_s > 0 and r.cond_step_s > 0 and r.decode_img_s != r.decode_img_s  # no decoder on CPU
    rows = [{"model": r.model, "variant": r.variant, "plans": {"every step": sampling_plan(r)}}]
    assert plot_sampling(rows, tmp_path / "s.png").stat().st_size > 0


def test_interval_fraction_of_the_250_step_sampler():
    # Brute force in float64: DiT's linear schedule (1000 steps), the 250 timesteps its DDPM sampler visits
    # (evenly spaced as facebookresearch/DiT's space_timesteps: round(i * 999 / 249)), sigma = sqrt((1 - abar) / abar).
    import numpy as np
    from helpers import load_tool

    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    abar = np.cumprod(1 - betas)
    visited = [round(i * 999 / 249) for i in range(250)]
    sigma = np.sqrt((1 - abar[visited]) / abar[visited])
    want = float(np.mean((sigma > 0.28) & (sigma <= 5.42)))
    assert load_tool("benchmark").interval_fraction(0.28, 5.42) == pytest.approx(want)
    assert 0.3 < want < 0.7  # a real interval: about half the steps


def test_kernel_breakdown_plot(tmp_path):
    from dit.benchmark import plot_kernel_breakdown

    r = Result(model="DiT-XL/2", variant="fast", params_m=675.0, gflops=237.0,
               train_kernels_ms={"gemm/conv": 70.0, "attention": 8.0, "idle": 2.0, "wall": 80.0})
    assert plot_kernel_breakdown([r], tmp_path / "k.png").stat().st_size > 0
    assert plot_kernel_breakdown([], tmp_path / "none.png") is None


@pytest.mark.parametrize("tool,args,option", [
    ("benchmark.py", ["--models", "DiT-S/2,Foo/2", "--variants", "eager-bf16"], "--models"),
    ("benchmark.py", ["--models", "DiT-S/2", "--variants", "eager-bf16,fastest"], "--variants"),
    ("benchmark.py", ["--sampling", "--models", "DiT-S/3"], "--models"),
    ("bench_trainer.py", ["--models", "DiT-XL/2,Foo/2"], "--models"),
    ("benchmark.py", ["--models", "DiT-S/2", "--variants", "eager-bf16", "--model-overrides", "{dpeth: 2}"],
     "--model-overrides"),
])
def test_benchmark_tools_refuse_unknown_models_and_variants_before_measuring(tool, args, option):
    """A typo in --models / --variants is a one-line usage error naming the option, the unknown name and the valid
    names (exit 2, before any timing or training starts), not a run of FAILED rows."""
    import subprocess
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / tool
    out = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    last = out.stderr.strip().splitlines()[-1]
    if option == "--model-overrides":  # the keyword the model does not take, and the ones it does
        assert last.startswith("benchmark.py: error: --model-overrides '{dpeth: 2}' for DiT-S/2: "), last
        assert "'dpeth'" in last and "depth" in last.split("'dpeth'", 1)[1]
    else:
        bad = next(a for a in args[1 + args.index(option)].split(",")
                   if a not in ("DiT-S/2", "DiT-XL/2", "eager-bf16"))
        assert last.startswith(f"{Path(tool).name}: error: {option}: unknown {bad!r}; valid: "), last
        assert ("DiT-XL/2" if option == "--models" else "fast-cg") in last
    assert "[bench]" not in out.stdout and "[trainer]" not in out.stdout  # nothing was measured


def test_benchmark_tool_measures_a_model_with_overrides(tmp_path):
    """--model-overrides builds every model with those keywords: the report's parameters and GFLOPs are the
    overridden model's (here a 1-block, 32-wide DiT-S/8 at 8x8 latents, on CPU)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from dit.benchmark import forward_gflops
    from dit.models import create_model

    tool = Path(__file__).resolve().parents[1] / "tools" / "benchmark.py"
    over = "{depth: 1, hidden_size: 32, num_heads: 2}"
    out = subprocess.run([sys.executable, str(tool), "--models", "DiT-S/8", "--variants", "eager-bf16",
                          "--model-overrides", over, "--input-size", "8", "--iters", "1", "--warmup", "0",
                          "--train-only", "--train-batch-small", "2", "--json", str(tmp_path / "r.json"),
                          "--out", str(tmp_path / "r.md"), "--plot", str(tmp_path / "r.png")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    (row,) = json.loads((tmp_path / "r.json").read_text())["results"]
    want = create_model("DiT-S/8", depth=1, hidden_size=32, num_heads=2, input_size=8)
    assert row["params_m"] == pytest.approx(sum(p.numel() for p in want.parameters()) / 1e6)
    assert row["gflops"] == pytest.approx(forward_gflops(want, torch.device("cpu")))
    assert row["train_img_s"] > 0 and over in (tmp_path / "r.md").read_text()  # the command is in the report


def test_benchmark_tool_runs_sampling_and_keeps_amp_dtype_to_training(tmp_path):
    """--sampling goes through the tool's own wiring to a report (a 1-block DiT on CPU); --amp-dtype fp16 is refused
    there with a usage error (it applies to the training / forward measurements only)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(__file__).resolve().parents[1] / "tools" / "benchmark.py"
    args = [sys.executable, str(tool), "--sampling", "--models", "DiT-S/8", "--variants", "eager-bf16",
            "--model-overrides", "{depth: 1, hidden_size: 32, num_heads: 2}", "--input-size", "8",
            "--sampling-batch", "2", "--sampling-steps", "2", "--iters", "1", "--warmup", "0",
            "--json", str(tmp_path / "s.json"), "--out", str(tmp_path / "s.md"), "--plot", str(tmp_path / "s.png")]
    out = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "[sampling] DiT-S/8 eager-bf16: guided step" in out.stdout and (tmp_path / "s.json").exists()
    assert json.loads((tmp_path / "s.json").read_text())
    out = subprocess.run(args + ["--amp-dtype", "fp16"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--amp-dtype fp16 applies to the training / forward" in out.stderr


def test_bench_trainer_runs_the_real_trainer(tmp_path):
    """tools/bench_trainer.py: tools/train.py on synthetic latents in a subprocess; the median step time after --skip
    steps becomes img/s; a run stopped by --timeout still reports the steps it logged; --profile's steps are left
    out of the median."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(__file__).resolve().parents[1] / "tools" / "bench_trainer.py"
    common = [sys.executable, str(tool), "--models", "DiT-S/2", "--log-every", "2", "--count", "64",
              "--batch-small", "4", "--latent-shape", "4,8,8",
              "model.overrides={depth: 1, hidden_size: 32, num_heads: 2}", "model.compile=false",
              "train.mixed_precision=no", "run.cpu_threads=1"]
    out = subprocess.run(common + ["--steps", "8", "--skip", "4", "--json", str(tmp_path / "a.json")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    (row,) = json.loads((tmp_path / "a.json").read_text())
    assert row["model"] == "DiT-S/2" and row["batch"] == 4 and row["steps_measured"] == 4  # steps 5..8
    assert row["img_s"] == pytest.approx(4 / (row["step_ms"] / 1e3)) and row["img_s"] > 0
    assert row["last_loss"] is not None
    assert isinstance(row["startup_s"], float) and math.isfinite(row["startup_s"])  # steps 1..4 minus 4 medians
    assert {"date", "torch", "device"} <= set(row["env"])  # what the figure was measured on
    # Long run, short timeout: stopped, and the steps logged after --skip are reported (the tiny model logs every
    # 2 steps from a few seconds after start-up, so 40 s leaves many).
    out = subprocess.run(common + ["--steps", "100000", "--skip", "2", "--timeout", "40", "--json",
                                   str(tmp_path / "b.json")], capture_output=True, text=True, timeout=300)
    assert "stopped after --timeout 40 s" in out.stdout, out.stdout + out.stderr
    assert out.returncode == 0, out.stdout + out.stderr
    (row,) = json.loads((tmp_path / "b.json").read_text())
    assert row["steps_measured"] >= 2 and row["img_s"] > 0
    # --profile 2 after --skip 2: steps 3-4 are profiled and left out of the median (steps 5-8 remain), and the
    # trace is kept beside --json.
    out = subprocess.run(common + ["--steps", "8", "--skip", "2", "--profile", "2", "--json", str(tmp_path / "c.json")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    (row,) = json.loads((tmp_path / "c.json").read_text())
    assert row["steps_measured"] == 4 and row["profile"]["steps"] == [3, 4]
    trace = Path(row["profile_trace"])
    assert trace == tmp_path / "c_DiT-S_2_trace.json.gz" and trace.stat().st_size > 0


def test_timeline_gaps_merges_overlaps_and_charges_gaps_to_the_next_activity():
    from dit.utils.profiling import timeline_gaps

    us = 1000  # ns
    events = [
        (0, 10 * us, "a"),
        (5 * us, 12 * us, "b"),  # overlaps a: busy 0-12 us, no gap
        (13 * us, 20 * us, "c"),  # 1 us gap before c
        (320 * us, 321 * us, "Memset"),  # 300 us gap before the memset
        (324 * us, 330 * us, "c"),  # 3 us gap before c
    ]
    r = timeline_gaps(events, iters=1)
    assert r["busy_ms"] == pytest.approx((12 + 7 + 1 + 6) / 1e3)
    assert r["gap_ms"] == pytest.approx((1 + 300 + 3) / 1e3)
    assert r["buckets"]["<2us"] == [1, pytest.approx(1e-3)] and r["buckets"]["2-5us"] == [1, pytest.approx(3e-3)]
    assert r["buckets"][">=100us"] == [1, pytest.approx(0.3)] and r["buckets"]["5-20us"] == [0, 0.0]
    assert r["before"][0] == ("Memset", pytest.approx(0.3)) and dict(r["before"])["c"] == pytest.approx(4e-3)
    assert r["largest"][0] == (pytest.approx(300.0), "c", "Memset")
    half = timeline_gaps(events * 1, iters=2)  # per-step figures over 2 steps
    assert half["gap_ms"] == pytest.approx(r["gap_ms"] / 2)
