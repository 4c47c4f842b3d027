"""Multi-GPU scaling report from tools/train.py run directories (see scripts/multigpu.sh).

    python tools/scaling_report.py --run 1gpu-b256:1:runs/s1 --run 2gpu-b256:2:runs/s2 --run 2gpu-b512:2:runs/s3 \
        --efficiency 1gpu-b256,2gpu-b512 --agree 1gpu-b256,2gpu-b256 --out scaling.md --plot scaling.png
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit.scaling import efficiency, loss_gap, markdown, plot_losses, summarize  # noqa: E402


def _pair(text: str, labels: dict, opt: str) -> tuple[str, str]:
    parts = text.split(",")
    if len(parts) != 2 or any(p not in labels for p in parts):
        raise SystemExit(f"error: {opt} {text!r}: expected two run labels separated by a comma, out of "
                         f"{', '.join(labels)}")
    return parts[0], parts[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", required=True, help="LABEL:PROCESSES:RUN_DIR (repeat)")
    p.add_argument("--efficiency", action="append", default=[], help="ONE,MANY: per-GPU scaling efficiency")
    p.add_argument("--agree", action="append", default=[], help="A,B: loss-curve gap of two same-batch runs")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--plot", type=Path, default=None)
    a = p.parse_args()
    dirs, procs = {}, {}
    for spec in a.run:
        label, _, rest = spec.partition(":")
        n, _, d = rest.partition(":")
        if not label or not n.isdigit() or not d:
            raise SystemExit(f"error: --run {spec!r}: expected LABEL:PROCESSES:RUN_DIR")
        dirs[label], procs[label] = d, int(n)
    try:
        runs = {k: summarize(k, d, procs[k]) for k, d in dirs.items()}
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    lines = [markdown(list(runs.values())), ""]
    extra = {}
    for spec in a.efficiency:
        one, many = _pair(spec, runs, "--efficiency")
        e = efficiency(runs[one], runs[many])
        extra[f"efficiency {many} vs {one}"] = e
        lines.append(f"- per-GPU scaling efficiency, {many} vs {one}: {e:.1%}")
    for spec in a.agree:
        x, y = _pair(spec, runs, "--agree")
        g = loss_gap(dirs[x], dirs[y])
        extra[f"loss gap {x} vs {y}"] = g
        lines.append(f"- loss curves {x} vs {y}: mean |difference| of 25-step means = {g:.2%} of the loss")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("\n".join(lines) + "\n")
    a.out.with_suffix(".json").write_text(json.dumps({"runs": {k: vars(v) for k, v in runs.items()}, **extra},
                                                     indent=1))
    if a.plot:
        plot_losses(dirs, a.plot)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
