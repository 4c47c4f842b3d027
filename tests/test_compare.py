"""The comparison study (dit/compare.py, tools/compare.py) on two tiny models in pixel space at 16 px.

One module-scoped study trains DiT-S/8 and UNet-S for 3 steps each (DiT-S/8 first interrupted at step 2, so the study
must resume it), samples 12 images per guidance scale and scores them with a barely trained classifier; the tests
then check the outputs, the shared budget, resuming and skipping, and the early, clear failures.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dit import compare
from dit.compare import CompareSettings, run_compare
from dit.config import load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["DiT-S/8", "UNet-S"]
COMMON = ["data.resolution=16", "data.num_samples=48", "data.num_workers=0", "train.global_batch_size=8",
          "train.log_every=1", "train.ckpt_every=1000", "sample.grid_size=1", "sample.num_steps=2",
          "run.tensorboard=false", "run.progress=false", "run.cpu_threads=1"]
PER_MODEL = ["DiT-S/8:model.overrides={hidden_size: 32, depth: 1, num_heads: 2}",
             "UNet-S:model.overrides={model_channels: 16, channel_mult: [1, 2], num_res_blocks: 1, "
             "attention_resolutions: [2], num_head_channels: 8, norm_groups: 8}"]
BUDGET = 20  # images -> ceil(20 / 8) = 3 steps, 24 images seen


def settings(out: Path, classifier: Path | None, **kw) -> CompareSettings:
    base = dict(models=list(MODELS), out_dir=str(out), budget_images=BUDGET, num_samples=12, sample_batch=12,
                num_steps=2, cfg_scale=2.0, eval_classifier=str(classifier) if classifier else None, num_real=24,
                grid_size=2, device="cpu")
    base.update(kw)
    return CompareSettings(**base)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    from dit.eval.shapes_eval import save_classifier, train_shapes_classifier
    from dit.train import train

    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("compare")
    clf, acc = train_shapes_classifier(resolution=16, num_train=24, num_val=12, steps=2, batch_size=8, width=8)
    clf_path = tmp / "clf.pt"
    save_classifier(clf, clf_path, classes=clf.classes, resolution=16, val_accuracy=acc)
    out = tmp / "out"
    s = settings(out, clf_path)
    # An interrupted run: DiT-S/8 stopped after 2 of its 3 steps (its config, as the study builds it).
    common, per_model = compare.split_overrides(COMMON + PER_MODEL, MODELS)
    partial = compare.model_configs(None, s, common, per_model, {"DiT-S/8": 2, "UNet-S": 2})["DiT-S/8"]
    train(partial)
    results = run_compare(s, None, COMMON + PER_MODEL)
    return {"out": out, "results": results, "clf": clf_path}


def test_outputs_one_row_per_model(study):
    out, results = study["out"], study["results"]
    assert [r["model"] for r in results["models"]] == MODELS
    on_disk = json.loads((out / "results.json").read_text())
    assert [r["model"] for r in on_disk["models"]] == MODELS
    report = (out / "report.md").read_text()
    table = [line for line in report.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(MODELS)  # header + one row per model
    assert table[1].startswith("| DiT-S/8 |") and table[2].startswith("| UNet-S |")
    assert "FD-shapes" in table[0] and "not* FID" in report
    for png in ("loss_curves.png", "score_vs_compute.png", "score_vs_gflops.png", "samples.png"):
        assert (out / png).stat().st_size > 1000, png
        assert f"]({png})" in report
    for r in results["models"]:
        assert r["params"] > 0 and r["gflops"] > 0 and r["train_img_per_s"] > 0
        assert math.isfinite(r["final_loss"])
        m = r["evals"][-1]["metrics"]
        assert set(m) == {"1", "2"}  # unguided and guided
        for v in m.values():
            assert 0.0 <= v["accuracy"] <= 1.0 and math.isfinite(v["fd_shapes"]) and v["sample_img_per_s"] > 0
            assert v["accuracy"] <= min(v["acc_colour"], v["acc_shape"])  # both halves right for a hit


def test_same_budget_data_and_sampling(study):
    rows = study["results"]["models"]
    assert {r["max_steps"] for r in rows} == {3}
    assert {r["images_seen"] for r in rows} == {24}
    for r in rows:  # compute axis = forward GFLOPs x 3 x images seen
        assert r["train_compute_gflop"] == pytest.approx(r["gflops"] * 3 * 24)
    cfgs = [to_dict(load_config(Path(r["run_dir"]) / "config.yaml")) for r in rows]
    for key in ("data", "diffusion", "train", "autoencoder", "sample"):
        assert cfgs[0][key] == cfgs[1][key], key
    # The same labels for every model, balanced over the 12 classes.
    labels = [np.load(r["evals"][-1]["metrics"]["2"]["npz"])["labels"] for r in rows]
    assert np.array_equal(labels[0], labels[1]) and np.bincount(labels[0], minlength=12).tolist() == [1] * 12


def test_interrupted_model_resumed(study):
    rows = {r["model"]: r for r in study["results"]["models"]}
    assert rows["DiT-S/8"]["resumed_from"].endswith("step_0000002.pt")
    assert rows["UNet-S"]["resumed_from"] is None
    steps = [r["step"] for r in compare.read_log(rows["DiT-S/8"]["run_dir"])]
    assert steps == [1, 2, 3]


def test_rerun_skips_finished_models(study):
    out = study["out"]
    ckpts = sorted((out / "UNet-S" / "checkpoints").glob("*.pt"))
    before = {p: p.stat().st_mtime_ns for p in ckpts}
    cache = sorted((out / "UNet-S" / "compare").glob("eval_*.json"))
    cache_before = {p: p.stat().st_mtime_ns for p in cache}
    again = run_compare(settings(out, study["clf"]), None, COMMON + PER_MODEL)
    assert all(r["skipped_training"] for r in again["models"])
    assert {p: p.stat().st_mtime_ns for p in ckpts} == before  # nothing retrained
    assert {p: p.stat().st_mtime_ns for p in cache} == cache_before  # evaluations reused
    assert [r["evals"][-1]["metrics"] for r in again["models"]] == [
        r["evals"][-1]["metrics"] for r in study["results"]["models"]]


def test_changed_budget_in_same_dir_is_refused(study):
    with pytest.raises(ValueError, match="trained for 3 steps but this budget asks for 5"):
        run_compare(settings(study["out"], study["clf"], budget_images=40), None, COMMON + PER_MODEL)


def test_unknown_model_fails_before_training(tmp_path, capsys):
    out = tmp_path / "never"
    with pytest.raises(ValueError, match=r"unknown model 'DiT-Q/3'.*Valid names"):
        run_compare(settings(out, None, models=["DiT-S/8", "DiT-Q/3"]), None, COMMON)
    assert not out.exists()
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import compare as cli  # tools/compare.py
    finally:
        sys.path.pop(0)
    rc = cli.main(["--models", "UNet-S,DiT-Q/3", "--budget-images", "8", "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown model 'DiT-Q/3'") and err.count("\n") == 1
    assert not out.exists()


@pytest.mark.parametrize("overrides, match", [
    (["UNet-S:train.lr=1e-3"], "may only set model"),
    (["DiT-X:model.learn_sigma=false"], "not one of --models"),
    (["train.max_steps=5"], "set by the comparison"),
    (["train.lrr=1e-3"], "unknown key 'train.lrr'"),
])
def test_bad_overrides_fail_early(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        run_compare(settings(tmp_path / "o", None), None, overrides)
    assert not (tmp_path / "o").exists()


def test_missing_inputs_fail_early(tmp_path):
    with pytest.raises(ValueError, match="give a budget"):
        run_compare(settings(tmp_path / "o", None, budget_images=None), None, COMMON)
    with pytest.raises(FileNotFoundError, match="--eval-classifier"):
        run_compare(settings(tmp_path / "o", tmp_path / "nope.pt"), None, COMMON)
    with pytest.raises(ValueError, match="both --inception"):
        run_compare(settings(tmp_path / "o", None, inception=str(tmp_path / "w.pth")), None, COMMON)
    assert not (tmp_path / "o").exists()


def test_budget_arithmetic_and_minutes_plan(tmp_path, monkeypatch):
    assert compare.steps_for_images(20, 8) == 3 and compare.steps_for_images(16, 8) == 2
    assert compare.steps_for_minutes(2.0, img_per_s=100.0, global_batch_size=32) == 375  # 12000 images / 32
    assert compare.eval_steps(10, 1) == [10] and compare.eval_steps(10, 3) == [4, 8, 10]
    speeds = {"DiT-S/8": 4.0, "UNet-S": 1.0}  # img/s "measured" by calibration
    monkeypatch.setattr(compare, "calibrate", lambda cfg, steps, scratch: speeds[cfg.model.name])
    s = settings(tmp_path, None, budget_images=80, budget_minutes=1.0)
    common, per_model = compare.split_overrides(COMMON + PER_MODEL, MODELS)
    plan = compare.plan_budget(s, compare.model_configs(None, s, common, per_model))
    # minutes: 60 s x img/s / 8 -> 30 and 7 steps; images: 10 steps; each model stops at the smaller
    assert plan["max_steps"] == {"DiT-S/8": 10, "UNet-S": 7}
    assert json.loads((tmp_path / "plan.json").read_text())["max_steps"] == plan["max_steps"]


def test_sample_noise_independent_of_batching():
    whole = compare.sample_noise(5, (3, 4, 4), seed=7)
    part = compare.sample_noise(2, (3, 4, 4), seed=7, start=3)
    assert torch.equal(whole[3:], part)
    assert not torch.equal(whole[0], compare.sample_noise(1, (3, 4, 4), seed=8)[0])


def test_calibration_times_the_real_trainer(tmp_path):
    s = settings(tmp_path, None, budget_minutes=1.0)
    common, per_model = compare.split_overrides(COMMON + PER_MODEL, MODELS)
    cfg = compare.model_configs(None, s, common, per_model)["DiT-S/8"]
    img_s = compare.calibrate(cfg, 3, tmp_path / "cal")
    rows = compare.read_log(tmp_path / "cal")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert img_s == pytest.approx(8 / sorted(r["step_time"] for r in rows)[1])  # batch / median step time
    assert not list((tmp_path / "cal" / "checkpoints").glob("*.pt"))  # only the timing is kept
    assert cfg.train.max_steps != 3 and cfg.run.out_dir != str(tmp_path / "cal")  # the study's config is untouched
