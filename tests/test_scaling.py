"""The multi-GPU scaling report (dit/scaling.py, tools/scaling_report.py) on synthetic run directories."""

import json

import pytest
import yaml

from dit.scaling import efficiency, loss_gap, markdown, summarize
from helpers import load_tool


def _run(tmp_path, name, batch, step_time, losses, peak=None):
    d = tmp_path / name
    d.mkdir()
    (d / "config.yaml").write_text(yaml.safe_dump({"train": {"global_batch_size": batch}}))
    rows = [{"step": i, "loss": v, "step_time": step_time * (5 if i < 3 else 1)} for i, v in enumerate(losses)]
    (d / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if peak is not None:
        (d / "summary.json").write_text(json.dumps({"peak_mem_gib": peak}))
    return d


def test_summary_efficiency_and_loss_gap(tmp_path):
    losses = [1.0 / (1 + 0.1 * i) for i in range(60)]
    one = _run(tmp_path, "one", 256, 0.10, losses, peak=12.5)
    two = _run(tmp_path, "two", 512, 0.11, losses)  # 2 GPUs, 256 each, 10% slower steps
    same = _run(tmp_path, "same", 256, 0.06, [v * 1.02 for v in losses])
    r1, r2 = summarize("one", one, 1, skip_steps=3), summarize("two", two, 2, skip_steps=3)
    assert r1.img_per_s == pytest.approx(2560) and r1.peak_mem_gib == 12.5  # warm-up steps are skipped
    assert r2.img_per_s_per_gpu == pytest.approx(256 / 0.11)
    assert efficiency(r1, r2) == pytest.approx(0.10 / 0.11)
    with pytest.raises(ValueError, match="per-GPU batch"):
        efficiency(r1, summarize("same", same, 2))
    gap = loss_gap(one, same)
    assert gap == pytest.approx(0.02 / 1.01, rel=1e-6)  # mean |a - 1.02 a| / mean of both curves
    assert loss_gap(one, one) == 0
    table = markdown([r1, r2])
    assert "| one | 1 | 256 | 60 | 2,560 |" in table and "n/a" in table


def test_tool_writes_report_and_rejects_bad_specs(tmp_path, capsys):
    losses = [1.0 - 0.01 * i for i in range(40)]
    a, b = _run(tmp_path, "a", 64, 0.1, losses), _run(tmp_path, "b", 128, 0.1, losses)
    tool = load_tool("scaling_report")
    out = tmp_path / "r.md"
    import sys
    argv = sys.argv
    try:
        sys.argv = ["scaling_report", "--run", f"1gpu:1:{a}", "--run", f"2gpu:2:{b}", "--efficiency", "1gpu,2gpu",
                    "--agree", "1gpu,2gpu", "--out", str(out), "--plot", str(tmp_path / "p.png")]
        tool.main()
        assert "efficiency, 2gpu vs 1gpu: 100.0%" in out.read_text() and (tmp_path / "p.png").stat().st_size > 0
        sys.argv = ["scaling_report", "--run", f"x:one:{a}", "--out", str(out)]
        with pytest.raises(SystemExit, match="LABEL:PROCESSES:RUN_DIR"):
            tool.main()
        sys.argv = ["scaling_report", "--run", f"x:1:{tmp_path / 'missing'}", "--out", str(out)]
        with pytest.raises(SystemExit, match="no training log"):
            tool.main()
    finally:
        sys.argv = argv
