"""The benchmark harness (tools/benchmark.py) on CPU: plumbing, report and the sampling-budget arithmetic."""

import pytest

from dit.benchmark import markdown_table, run_benchmarks, sampling_budget


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
