"""The benchmark harness (tools/benchmark.py) on CPU: plumbing, report and the sampling-budget arithmetic."""

import pytest

from dit.benchmark import Result, kernel_category, kernel_table, markdown_table, run_benchmarks, sampling_budget


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
