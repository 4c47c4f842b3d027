"""Training throughput of the real trainer (``tools/train.py``: data loading, EMA, clipping, logging included) on
synthetic latents, to set beside ``tools/benchmark.py``'s isolated training step of the same model.

    python tools/bench_trainer.py --models DiT-S/2,DiT-XL/2 --steps 300                 # bf16, model.compile=true
    python tools/bench_trainer.py --models UNet-S --steps 200 model.compile=false       # extra key=value overrides

Each model trains in its own process (fresh compile caches and GPU memory) from the built-in default config with
``data.source=latents`` on random bf16 latents (``--latent-shape``, default 4x32x32 as sd-vae at 256 px, 1000
classes), no sample grids and no checkpoint before the last step. Reported: the median host time per step over the
log intervals after the first ``--skip`` steps (compilation), as img/s, the peak GPU memory, and the start-up: the time
the first ``--skip`` steps took beyond as many steady-state steps (compilation, CUDA-graph capture). ``--profile N``
adds where the GPU time of N steps after ``--skip`` goes (by kernel category, and the idle time between kernels); those
steps are left out of the median.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dit.benchmark import environment, unknown_names_error  # noqa: E402
from dit.data.latents import make_synthetic_latents  # noqa: E402
from dit.models import list_models  # noqa: E402
from dit.utils import profiling  # noqa: E402


def _read_log(path: Path) -> list[dict]:
    """The trainer's per-step log rows; a run stopped by ``--timeout`` may have left its last line half-written."""
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="DiT-S/2,DiT-XL/2")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--skip", type=int, default=60, help="steps left out of the median (compilation, warm-up)")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batch-small", type=int, default=256, help="batch for S models")
    p.add_argument("--latent-shape", default="4,32,32")
    p.add_argument("--count", type=int, default=8192, help="synthetic latents (kept in memory)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds per model; on expiry the run is stopped and the steps logged so far are reported")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also profile N steps after --skip (the trainer's run.profile_steps): GPU time per step by "
                        "kernel category and idle time, printed and kept in --json (the Perfetto trace beside it)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="extra config overrides for every run")
    a = p.parse_args()
    if a.skip >= a.steps:
        p.error(f"--skip ({a.skip}) must be smaller than --steps ({a.steps})")
    if a.profile < 0 or a.skip + a.profile > a.steps:
        p.error(f"--profile ({a.profile}) must be >= 0 and fit after --skip ({a.skip}) within --steps ({a.steps})")
    try:
        shape = tuple(int(s) for s in a.latent_shape.split(","))
        assert len(shape) == 3 and min(shape) > 0
    except (ValueError, AssertionError):
        p.error(f"--latent-shape must be C,H,W positive integers, got {a.latent_shape!r}")
    models = [m for m in a.models.split(",") if m]
    error = unknown_names_error("--models", models, list_models())
    if error:
        p.error(error)
    rows, env = [], environment()
    with tempfile.TemporaryDirectory() as tmp:
        lat = make_synthetic_latents(Path(tmp) / "latents", count=a.count, shape=shape, shard_size=4096)
        for name in models:
            batch = a.batch_small if "-S/" in name or name.endswith("-S") else a.batch
            out = Path(tmp) / name.replace("/", "_")
            cmd = [sys.executable, str(ROOT / "tools" / "train.py"), f"run.out_dir={out}", f"model.name={name}",
                   "data.source=latents", f"data.path={lat}", "autoencoder.spec=synthetic",
                   f"data.resolution={8 * shape[-1]}", "data.num_workers=0", "sample.grid_size=0",
                   "train.mixed_precision=bf16", "model.compile=true", f"train.global_batch_size={batch}",
                   f"train.max_steps={a.steps}", f"train.log_every={a.log_every}",
                   f"train.ckpt_every={10 * a.steps}", "run.progress=false", "run.tensorboard=false", *a.overrides]
            if a.profile:
                cmd += [f"run.profile_from={a.skip}", f"run.profile_steps={a.profile}"]
            print(f"[trainer] {name} batch {batch}: {' '.join(cmd[2:])}", flush=True)
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
                print(f"[trainer] {name}: stopped after --timeout {a.timeout:.0f} s; reporting the steps logged",
                      flush=True)
            if not timed_out:  # how the trainer ran its optimizer step (dit/optim.py)
                for line in proc.stderr.splitlines():
                    if "AdamW + EMA:" in line:
                        print(f"[trainer] {name}: AdamW + EMA:{line.split('AdamW + EMA:', 1)[1]}", flush=True)
            if not timed_out and proc.returncode != 0:
                print(f"[trainer] {name}: FAILED (exit {proc.returncode}): {proc.stderr.strip()[-600:]}", flush=True)
                continue
            log_path = out / "train_log.jsonl"
            log = _read_log(log_path)
            # the profiled steps' step_time carries the profiler's overhead and trace export (the trainer marks them)
            times = [r["step_time"] for r in log if r["step"] > a.skip and not r.get("profiled")]
            if not times:
                print(f"[trainer] {name}: no logged steps after step {a.skip} outside the profiled ones (raise "
                      f"--steps)", flush=True)
                continue
            summary = {} if timed_out else json.loads((out / "summary.json").read_text())
            step_s = statistics.median(times)
            # Start-up: what the first --skip steps took beyond steady-state steps (compilation, CUDA-graph capture).
            first = [r["step_time"] for r in log if r["step"] <= a.skip]
            startup_s = sum(first) - len(first) * step_s
            row = {"model": name, "batch": batch, "step_ms": 1e3 * step_s, "img_s": batch / step_s,
                   "startup_s": startup_s,
                   "peak_mem_gib": summary.get("peak_mem_gib"), "last_loss": summary.get("last_loss"),
                   "skipped_steps": summary.get("bad_steps"),  # non-finite (fp16: loss-scale overflow) steps
                   "overrides": a.overrides, "steps_measured": len(times),  # one log row per step
                   "env": env}  # device, versions, date of the measurement
            if (out / "profile.json").exists():
                row["profile"] = json.loads((out / "profile.json").read_text())
                trace = out / "profile_trace.json.gz"
                if a.json is not None and trace.exists():  # the run's folder is temporary
                    kept = a.json.with_name(f"{a.json.stem}_{name.replace('/', '_')}_trace.json.gz")
                    shutil.copyfile(trace, kept)
                    row["profile_trace"] = str(kept)
                print(f"[trainer] {name}: profile of steps {a.skip + 1}-{a.skip + a.profile}: "
                      f"{profiling.describe(row['profile'])}", flush=True)
            rows.append(row)
            print(f"[trainer] {name}: {row['step_ms']:.1f} ms/step = {row['img_s']:,.0f} img/s, peak "
                  f"{row['peak_mem_gib'] or float('nan'):.1f} GiB, start-up {startup_s:.0f} s, last loss "
                  f"{row['last_loss'] or float('nan'):.4f}, {row['skipped_steps']} skipped steps", flush=True)
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(rows, indent=1))
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
