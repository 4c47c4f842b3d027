"""Multi-GPU scaling report: training img/s per GPU at N processes vs one, and loss-curve agreement.

Reads the run directories written by ``tools/train.py`` (``train_log.jsonl`` and ``config.yaml``) of runs launched
with different process counts (``scripts/multigpu.sh``) and turns them into one Markdown table plus a loss-curve plot.
Nothing here needs a GPU: the runs did the work.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import yaml


@dataclass
class ScalingRun:
    label: str
    processes: int
    global_batch: int
    steps: int
    img_per_s: float  # whole job, median over logged steps after warm-up
    img_per_s_per_gpu: float
    final_loss: float  # mean of the last `tail` logged losses
    peak_mem_gib: float | None


def read_rows(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "train_log.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no training log (is {run_dir!r} a tools/train.py run directory?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize(label: str, run_dir: str | Path, processes: int, *, skip_steps: int = 20, tail: int = 20) -> ScalingRun:
    """One run: throughput from the logged per-step host times after ``skip_steps`` warm-up steps (compilation,
    allocator growth), final loss over the last ``tail`` steps, peak memory from ``summary.json`` if present."""
    rows = read_rows(run_dir)
    cfg = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
    batch = int(cfg["train"]["global_batch_size"])
    times = [r["step_time"] for r in rows if r.get("step_time") and r["step"] >= skip_steps] or \
        [r["step_time"] for r in rows if r.get("step_time")]
    if not times:
        raise ValueError(f"{run_dir}: no step times in train_log.jsonl")
    img_s = batch / statistics.median(times)
    losses = [r["loss"] for r in rows if r.get("loss") is not None and math.isfinite(r["loss"])]
    summary = Path(run_dir) / "summary.json"
    peak = json.loads(summary.read_text()).get("peak_mem_gib") if summary.is_file() else None
    return ScalingRun(label=label, processes=processes, global_batch=batch, steps=len(rows), img_per_s=img_s,
                      img_per_s_per_gpu=img_s / processes, final_loss=statistics.fmean(losses[-tail:]),
                      peak_mem_gib=peak)


def loss_gap(a: str | Path, b: str | Path, window: int = 25) -> float:
    """Mean absolute difference of two runs' moving-average losses (window ``window`` steps) over their common steps,
    relative to the mean loss: how far apart two curves of the same global batch and data order are. Their noise and
    timesteps differ (drawn per rank), so they agree statistically, not bit for bit."""
    la = {r["step"]: r["loss"] for r in read_rows(a)}
    lb = {r["step"]: r["loss"] for r in read_rows(b)}
    steps = sorted(set(la) & set(lb))
    if len(steps) < window:
        raise ValueError(f"runs share {len(steps)} logged steps, fewer than the window {window}")

    def smooth(d: dict) -> list[float]:
        v = [d[s] for s in steps]
        return [statistics.fmean(v[i - window + 1: i + 1]) for i in range(window - 1, len(v))]

    sa, sb = smooth(la), smooth(lb)
    return statistics.fmean(abs(x - y) for x, y in zip(sa, sb)) / statistics.fmean(sa + sb)


def efficiency(one: ScalingRun, many: ScalingRun) -> float:
    """Per-GPU scaling efficiency: img/s per GPU at N processes over img/s of one GPU, same per-GPU batch."""
    if one.global_batch / one.processes != many.global_batch / many.processes:
        raise ValueError(f"{one.label} and {many.label} have different per-GPU batches: weak scaling compares the "
                         f"same per-GPU batch")
    return many.img_per_s_per_gpu / one.img_per_s_per_gpu


def markdown(runs: list[ScalingRun]) -> str:
    rows = ["| run | processes | global batch | steps | img/s | img/s per GPU | final loss | peak GiB (rank 0) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        peak = f"{r.peak_mem_gib:.1f}" if r.peak_mem_gib is not None else "n/a"
        rows.append(f"| {r.label} | {r.processes} | {r.global_batch} | {r.steps} | {r.img_per_s:,.0f} "
                    f"| {r.img_per_s_per_gpu:,.0f} | {r.final_loss:.4f} | {peak} |")
    return "\n".join(rows)


def plot_losses(runs: dict[str, str | Path], path: str | Path, window: int = 25) -> Path:
    """Moving-average loss against step for each labelled run directory, one axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, d in runs.items():
        rows = read_rows(d)
        s = [r["step"] for r in rows]
        v = [r["loss"] for r in rows]
        sm = [statistics.fmean(v[max(0, i - window + 1): i + 1]) for i in range(len(v))]
        ax.plot(s, sm, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"training loss ({window}-step mean)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
