"""Where a step's time goes: torch.profiler results summarised per step, for ``tools/benchmark.py --profile`` (the
isolated step) and the trainer's ``run.profile_steps`` (the real loop).

A summary is the device time per step by kernel category (``KERNEL_CATEGORIES``), the top kernels, and where the GPU
sits idle (``timeline_gaps``). On a machine without a GPU the categories are empty and the top list holds the CPU ops.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

# Kernel-name fragments -> category, first match wins. cuBLAS/CUTLASS GEMMs on Hopper are named nvjet_*, sm90_xmma_*,
# cutlass*; Triton GEMM templates chosen by max-autotune are triton_tem_*.
KERNEL_CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("flash", "fmha", "attention", "sdpa", "_attn_")),  # _attn_: our Triton backward (attention_triton)
    ("gemm/conv", ("gemm", "nvjet", "xmma", "cutlass", "triton_tem", "sm90_", "sm80_", "cublas", "conv")),
    ("optimizer", ("adam", "multi_tensor")),
    ("fused elementwise/norm (Triton)", ("triton",)),
    # cuDNN's NCHW <-> NHWC conversions around every convolution of a channels-first model
    ("layout transposes", ("nchwtonhwc", "nhwctonchw")),
    ("copies/casts", ("copy", "cast", "memcpy", "memset", "fill")),
)

GAP_BUCKETS_US = (2.0, 5.0, 20.0, 100.0)  # upper bounds of the gap-size buckets of ``timeline_gaps`` (last: open)


def kernel_category(name: str) -> str:
    low = name.lower()
    for cat, keys in KERNEL_CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def is_annotation(name: str) -> bool:
    """GPU-side profiler annotations (e.g. "Optimizer.step#AdamW.step", "ProfilerStep#3") span kernels counted
    already: they are not activities of their own."""
    return "#" in name or name.startswith("ProfilerStep")


def timeline_gaps(events: list[tuple[int, int, str]], iters: int = 1, top: int = 25) -> dict:
    """Where the GPU sits idle between kernels. ``events``: (start_ns, end_ns, name) of every device activity (kernels,
    memsets, copies) over ``iters`` steps. Overlapping activities are merged; each gap between busy intervals is
    charged to the activity that ends it. Returns per-step figures: ``busy_ms``, ``gap_ms``, ``buckets`` {"<2us":
    [count, ms], ..., ">=100us": [count, ms]}, ``before`` [(name, ms)] (the names that most often wait), and
    ``largest`` [(us, previous name, next name)]."""
    events = sorted(events)
    labels = [f"<{GAP_BUCKETS_US[0]:g}us"] + [f"{a:g}-{b:g}us" for a, b in zip(GAP_BUCKETS_US, GAP_BUCKETS_US[1:])]
    labels.append(f">={GAP_BUCKETS_US[-1]:g}us")
    buckets = {k: [0, 0.0] for k in labels}
    before: dict[str, float] = {}
    gaps = []
    busy = 0.0
    end, last = None, ""
    for start, stop, name in events:
        if end is not None and start > end:
            us = (start - end) / 1e3
            k = labels[sum(us >= b for b in GAP_BUCKETS_US)]
            buckets[k][0] += 1
            buckets[k][1] += us / 1e3
            before[name] = before.get(name, 0.0) + us / 1e3
            gaps.append((us, last, name))
        if end is None or start > end:
            busy += (stop - start) / 1e6
        elif stop > end:
            busy += (stop - end) / 1e6
        if end is None or stop > end:
            end, last = stop, name
    per = 1.0 / iters
    return {
        "busy_ms": busy * per,
        "gap_ms": sum(g for g, *_ in gaps) / 1e3 * per,
        "buckets": {k: [round(c * per, 2), ms * per] for k, (c, ms) in buckets.items()},
        "before": sorted(((n, ms * per) for n, ms in before.items()), key=lambda kv: -kv[1])[:top],
        "largest": sorted(gaps, reverse=True)[:top],
    }


def summarize(prof, steps: int, top: int = 12) -> tuple[dict[str, float], list[tuple[str, float, int]], dict]:
    """A finished ``torch.profiler.profile`` over ``steps`` steps -> (device ms per step by category, most expensive
    first; the ``top`` kernels as (name, ms per step, launches per step); ``timeline_gaps`` of the device activities,
    {} without any). Without device activities (a CPU run) the top list holds the CPU ops by self time instead."""
    cats: dict[str, float] = {}
    kernels, cpu_ops = [], []
    for e in prof.key_averages():
        if is_annotation(e.key):
            continue
        if e.device_type == DeviceType.CUDA:
            ms = e.self_device_time_total / 1e3 / steps  # us -> ms per step
            cats[kernel_category(e.key)] = cats.get(kernel_category(e.key), 0.0) + ms
            kernels.append((e.key[:120], ms, round(e.count / steps)))
        elif e.device_type == DeviceType.CPU:
            cpu_ops.append((e.key[:120], e.self_cpu_time_total / 1e3 / steps, round(e.count / steps)))
    timeline = [(e.start_ns(), e.end_ns(), e.name()) for e in prof.profiler.kineto_results.events()
                if e.device_type() == DeviceType.CUDA and not e.is_user_annotation() and not is_annotation(e.name())]
    gaps = timeline_gaps(timeline, iters=steps) if timeline else {}
    listed = kernels or cpu_ops
    listed.sort(key=lambda k: -k[1])
    return dict(sorted(cats.items(), key=lambda kv: -kv[1])), listed[:top], gaps


def start(device) -> object:
    """A started ``torch.profiler.profile`` of the host and, on CUDA, the device; ``finish`` ends it."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = profile(activities=activities)
    prof.start()
    return prof


def finish(prof, device, steps: tuple[int, int], out_dir) -> str:
    """Stop ``prof`` (after the device has finished the profiled steps ``(first, last)``), write the summary to
    ``out_dir/profile.json`` and the trace to ``out_dir/profile_trace.json.gz``; returns a one-line summary."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    prof.stop()
    n = steps[1] - steps[0] + 1
    cats, top, gaps = summarize(prof, n, top=25)
    out_dir = Path(out_dir)
    report = {"steps": list(steps), "device": str(device), "device_ms_per_step": cats, "top": top, "gaps": gaps}
    (out_dir / "profile.json").write_text(json.dumps(report, indent=1) + "\n")
    prof.export_chrome_trace(str(out_dir / "profile_trace.json.gz"))
    return f"profile of steps {steps[0]}-{steps[1]}: {describe(report)} ({out_dir / 'profile.json'})"


def describe(report: dict) -> str:
    """One line of a ``finish`` report: GPU ms per step by category and the idle time, or the top CPU ops."""
    if report["device_ms_per_step"]:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in report["device_ms_per_step"].items())
        return f"GPU ms per step: {parts}; idle between kernels {report['gaps'].get('gap_ms', 0.0):.2f}"
    return "no GPU activity; top CPU ops (ms per step): " + ", ".join(f"{k} {v:.2f}" for k, v, _ in report["top"][:5])
