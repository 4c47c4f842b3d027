"""FSDP2 sharding (``train.fsdp``): parity with DDP, exact resume and the checkpoint format, on 2 CPU processes (gloo).

The 2-process trainings run in this file's ``__main__`` under ``accelerate launch`` (one launch per precision: a launch
costs seconds of start-up on a small CPU, a tiny training about one); the tests read what the ranks wrote.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_train import ROOT, _log, _train, tiny_overrides

UNET = ("{model_channels: 32, channel_mult: [1, 1], num_res_blocks: 1, attention_resolutions: [2], "
        "num_head_channels: 32}")
COMMON = ["train.max_steps=4", "train.grad_accum_steps=2", "train.warmup_steps=2", "train.sample_every=2"]
# name -> (out_dir, extra overrides); run in this order, in one process group. "part" stops at step 2 and "resumed"
# continues it to step 4 in the same run directory.
RUNS = {
    "no": {"ddp": ("ddp", []), "fsdp": ("fsdp", ["train.fsdp=true"]),
           "part": ("part", ["train.fsdp=true", "train.max_steps=2"]),
           "resumed": ("part", ["train.fsdp=true", "train.resume=auto"])},
    "bf16": {"dit": ("dit", ["train.fsdp=true", "model.grad_checkpointing=true"]),
             "unet_ddp": ("unet_ddp", ["model.name=UNet-S", f"model.overrides={UNET}"]),
             "unet": ("unet", ["train.fsdp=true", "model.name=UNet-S", f"model.overrides={UNET}"])},
}


def _main(out: Path, precision: str) -> None:
    """Every training of ``RUNS[precision]`` on this rank; writes ``out/<name>.rank<k>.json`` summaries."""
    import accelerate

    from dit.config import load_config
    from dit.train import train

    # train() ends with Accelerator.end_training(), which destroys the process group; keep it for the next run.
    accelerate.Accelerator.end_training = lambda self: None
    for name, (run_dir, extra) in RUNS[precision].items():
        precision_override = f"train.mixed_precision='{precision}'"  # quoted: YAML reads a bare no as False
        cfg = load_config(None, tiny_overrides(out / run_dir) + COMMON + [precision_override] + extra)
        summary = train(cfg)
        (out / f"{name}.rank{summary['rank']}.json").write_text(json.dumps(summary))
    torch.distributed.destroy_process_group()


def _launch(out: Path, precision: str) -> Path:
    launcher = Path(sys.executable).parent / "accelerate"
    if not launcher.exists():
        pytest.skip("accelerate launcher not installed")
    # As in test_train.py: several CPU processes (gloo) go through --multi_gpu with ACCELERATE_USE_CPU set.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run([str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", precision, "--dynamo_backend", "no", __file__, str(out), precision],
                         capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def fp32_runs(tmp_path_factory) -> Path:
    return _launch(tmp_path_factory.mktemp("fsdp_fp32"), "no")


@pytest.fixture(scope="module")
def bf16_runs(tmp_path_factory) -> Path:
    return _launch(tmp_path_factory.mktemp("fsdp_bf16"), "bf16")


def _summaries(out: Path, name: str) -> list[dict]:
    return [json.loads((out / f"{name}.rank{r}.json").read_text()) for r in range(2)]


def _ckpt(out: Path, run_dir: str, step: int) -> dict:
    return torch.load(out / run_dir / "checkpoints" / f"step_{step:07d}.pt", weights_only=True)


def _max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |a| (elementwise relative errors are meaningless for entries near zero)."""
    return ((a.double() - b.double()).abs().max() / a.double().abs().max().clamp_min(1e-30)).item()


# --------------------------------------------------------------------------------------------------------------------
# Pieces, in this process
# --------------------------------------------------------------------------------------------------------------------

def test_shard_units_dit_blocks_unet_stages():
    from dit.fsdp import shard_units
    from dit.models import create_model

    dit = create_model("DiT-S/2", input_size=8, depth=2, hidden_size=64, num_heads=2)
    assert shard_units(dit) == list(dit.blocks)
    unet = create_model("UNet-S", input_size=8, model_channels=32, channel_mult=[1, 1], num_res_blocks=1,
                        attention_resolutions=[2], num_head_channels=32)
    units = shard_units(unet)
    # every input/output stage alone, the middle block (a list with its own forward) as one unit
    assert units == [*unet.input_blocks, unet.middle_block, *unet.output_blocks]


def test_fsdp_fp16_refused_and_one_process_ignored(tmp_path, caplog):
    from dit.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="train.fsdp does not support mixed_precision=fp16"):
        load_config(None, ["train.fsdp=true", "train.mixed_precision=fp16"])
    with caplog.at_level(logging.INFO, logger="dit.train"):
        summary = _train(tmp_path, "train.fsdp=true", "train.max_steps=2")
    assert summary["steps"] == 2 and summary["fsdp"] is False
    assert "train.fsdp is ignored with one process" in caplog.text


# --------------------------------------------------------------------------------------------------------------------
# Two processes
# --------------------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_fsdp_matches_ddp_and_writes_the_same_checkpoint(fp32_runs):
    """FSDP and DDP on 2 processes, fp32, same seed and global batch: equal losses and weights within 1e-5.

    The reference is the 2-process DDP run, not a 1-process run: noise, timesteps and label dropout are drawn from
    (seed, rank, micro-step), so only a run with the same ranks sees the same randomness. The results are not
    bitwise equal (measured: ~4e-6 after 4 steps): Adam on a shard and on the full tensor round differently in
    places (vectorised body vs tail of the fused CPU kernel), and Adam's normalisation amplifies last-bit
    differences of small gradients."""
    ddp, fsdp = _summaries(fp32_runs, "ddp"), _summaries(fp32_runs, "fsdp")
    assert [s["fsdp"] for s in ddp + fsdp] == [False, False, True, True]
    assert fsdp[0]["weights_digest"] == fsdp[1]["weights_digest"]  # the digest of the gathered full weights
    assert fsdp[0]["checkpoint"] and fsdp[1]["checkpoint"] is None  # gathered on all ranks, written by rank 0
    la, lb = _log(fp32_runs / "ddp"), _log(fp32_runs / "fsdp")
    assert [r["step"] for r in la] == [r["step"] for r in lb] == [1, 2, 3, 4]
    for ra, rb in zip(la, lb):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5) and rb["lr"] == ra["lr"]
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-4)
    assert sorted(p.name for p in (fp32_runs / "fsdp" / "samples").iterdir()) == ["step_0000002.png",
                                                                                  "step_0000004.png"]

    a, b = _ckpt(fp32_runs, "ddp", 4), _ckpt(fp32_runs, "fsdp", 4)
    assert set(a) == set(b)
    for key in ("model", "ema"):
        assert list(a[key]) == list(b[key])  # same keys, same order
        for name, v in a[key].items():
            assert b[key][name].shape == v.shape and b[key][name].dtype == v.dtype, (key, name)
            assert _max_rel_err(v, b[key][name]) < 1e-5, (key, name, _max_rel_err(v, b[key][name]))
    from dit.train import state_digest

    assert state_digest(b["model"]) == fsdp[0]["weights_digest"]
    # the optimizer state has the unsharded format: integer ids, full tensors, the same param groups
    assert a["opt"]["param_groups"] == b["opt"]["param_groups"]
    assert sorted(a["opt"]["state"]) == sorted(b["opt"]["state"]) and all(isinstance(i, int) for i in b["opt"]["state"])
    for pid, st in a["opt"]["state"].items():
        assert set(st) == set(b["opt"]["state"][pid])
        for k, v in st.items():
            w = b["opt"]["state"][pid][k]
            assert w.shape == v.shape and w.dtype == v.dtype, (pid, k)
            assert _max_rel_err(v, w) < 1e-5, (pid, k)
    assert a["lr_scheduler"] == b["lr_scheduler"] and a["data_state"] == b["data_state"]


@pytest.mark.slow
def test_fsdp_resume_is_exact(fp32_runs):
    """FSDP: 2 steps, then resumed to 4 == 4 steps straight, bit for bit (losses, lr, weights, EMA, optimizer)."""
    straight, resumed = _summaries(fp32_runs, "fsdp"), _summaries(fp32_runs, "resumed")
    assert resumed[0]["resumed_from"].endswith("step_0000002.pt")
    assert resumed[0]["weights_digest"] == straight[0]["weights_digest"]
    la, lb = _log(fp32_runs / "fsdp"), _log(fp32_runs / "part")
    assert [r["step"] for r in lb] == [1, 2, 3, 4]
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]  # bitwise equal floats
    assert [r["lr"] for r in la] == [r["lr"] for r in lb]  # the warm-up continues where it stopped
    a, b = _ckpt(fp32_runs, "fsdp", 4), _ckpt(fp32_runs, "part", 4)
    for key in ("model", "ema"):
        for name, v in a[key].items():
            assert torch.equal(v, b[key][name]), (key, name)
    for pid, st in a["opt"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, b["opt"]["state"][pid][k]), (pid, k)
    assert a["opt"]["param_groups"] == b["opt"]["param_groups"] and a["lr_scheduler"] == b["lr_scheduler"]


@pytest.mark.slow
def test_fsdp_checkpoint_loads_and_resumes_unsharded(fp32_runs, tmp_path):
    """An FSDP checkpoint is an ordinary one: the sampler loads it, a strict load_state_dict takes it, and a
    1-process run without FSDP resumes from it (optimizer included)."""
    from dit.models import create_model
    from dit.sample import load_sampling_setup

    path = fp32_runs / "fsdp" / "checkpoints" / "step_0000004.pt"
    state = torch.load(path, weights_only=True)
    setup = load_sampling_setup(path)
    for name, v in setup.model.state_dict().items():
        assert torch.equal(v, state["ema"][name]), name
    model = create_model(state["model_name"], **state["model_kwargs"])
    model.load_state_dict(state["model"], strict=True)

    run = tmp_path / "run"
    shutil.copytree(fp32_runs / "fsdp", run)
    summary = _train(run, *COMMON, "train.max_steps=5", "train.resume=auto")
    assert summary["resumed_from"].endswith("step_0000004.pt") and summary["steps"] == 5 and not summary["fsdp"]
    resumed = torch.load(summary["checkpoint"], weights_only=True)
    for pid, st in state["opt"]["state"].items():  # Adam continued from the loaded moments: one more step
        assert resumed["opt"]["state"][pid]["step"].item() == st["step"].item() + 1


@pytest.mark.slow
def test_fsdp_bf16_dit_and_unet(bf16_runs):
    """bf16 under FSDP (bf16 all-gathers, fp32 reduction, autocast), with gradient checkpointing (DiT) and on the
    UNet, whose stages and middle block are the sharded units: finite losses, close to the DDP bf16 run."""
    for name in ("dit", "unet", "unet_ddp"):
        s0, s1 = _summaries(bf16_runs, name)
        assert s0["steps"] == 4 and s0["bad_steps"] == 0 and s0["weights_digest"] == s1["weights_digest"], name
    la, lb = _log(bf16_runs / "unet_ddp"), _log(bf16_runs / "unet")
    assert [r["step"] for r in la] == [r["step"] for r in lb] == [1, 2, 3, 4]
    for ra, rb in zip(la, lb):
        # bf16 weights are the same roundings in both; only ops autocast keeps in fp32 see them differently
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-2), (ra, rb)
    state = _ckpt(bf16_runs, "unet", 4)
    assert all(v.dtype == torch.float32 for v in state["model"].values())  # fp32 master weights


if __name__ == "__main__":
    _main(Path(sys.argv[1]), sys.argv[2])
