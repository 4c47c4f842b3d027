"""Tests of dit.sample and tools/sample.py on tiny random models with the identity autoencoder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import load_tool
import torch
from PIL import Image

from dit.models import create_model
from dit.sample import (NO_CKPT_MESSAGE, SamplingSetup, gather_npz_parts, load_sampling_setup, parse_class_labels,
                        sample_images, sample_npz_parts, sample_official)

TINY = dict(input_size=8, hidden_size=32, depth=2, num_heads=2)




def _randomise(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """DiT zero-initialises its output layers; give every learned weight random values so outputs depend on inputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def _our_ckpt(path: Path, *, name: str = "DiT-S/2", in_channels: int = 3, num_classes: int = 4,
              text: bool = False, context_dim: int = 16) -> Path:
    kwargs = dict(TINY, in_channels=in_channels)
    if text:
        kwargs["context_dim"] = context_dim  # 384 = the packaged MiniLM's width, to really encode prompts
    else:
        kwargs["num_classes"] = num_classes
    model = _randomise(create_model(name, **kwargs))
    sd = model.state_dict()
    torch.save({
        "model": sd, "ema": sd, "step": 0, "model_name": name, "model_kwargs": kwargs,
        "config": {"sample": {"sampler": "ddim", "num_steps": 3, "cfg_scale": 2.0}, "text": {"max_length": 8}},
        "autoencoder": {"spec": "identity", "scale": 1.0, "shift": None, "latent_channels": 3, "downsample_factor": 1},
        "diffusion": {"noise_schedule": "linear", "diffusion_steps": 1000, "learn_sigma": True},
        "class_names": [] if text else [f"class {i}" for i in range(num_classes)],
        "text_encoder": "minilm" if text else None,
    }, path)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return _our_ckpt(tmp_path_factory.mktemp("ck") / "tiny.pt")


# ---------------------------------------------------------------- grids
def test_tool_writes_grid_of_the_right_size(ckpt, tmp_path, capsys):
    out = tmp_path / "grid.png"
    load_tool("sample").main(["--ckpt", str(ckpt), "--class-labels", "0,1,class 2", "--steps", "3", "--out",
                               str(out), "--device", "cpu"])
    img = np.asarray(Image.open(out))
    # 3 images of 8x8 in a 2-column grid with 2 px padding: 2 * (8 + 2) + 2 = 22
    assert img.shape == (22, 22, 3)
    assert img[2:10, 2:10].std() > 0  # a real sample, not padding
    assert "saved" in capsys.readouterr().out


def test_same_seed_same_images_and_ema_default(ckpt):
    setup = load_sampling_setup(ckpt)
    assert setup.model_name == "DiT-S/2" and setup.defaults == {"sampler": "ddim", "steps": 3, "cfg_scale": 2.0,
                                                                       "precision": "bf16"}
    a = sample_images(setup, labels=[0, 1], seed=3, sampler="ddpm", steps=2)
    b = sample_images(setup, labels=[0, 1], seed=3, sampler="ddpm", steps=2)
    c = sample_images(setup, labels=[0, 1], seed=4, sampler="ddpm", steps=2)
    assert a.dtype == np.uint8 and a.shape == (2, 8, 8, 3)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


# ---------------------------------------------------------------- official convention
def _official_reference(model, labels, num_classes, steps, cfg_scale, seed, latent_shape):
    """A literal transcription of facebookresearch/DiT sample.py + its GaussianDiffusion DDPM loop (numpy float64
    tables indexed and cast to float32, learned-range variance, respacing with the same steps)."""
    # create_diffusion(str(steps)): linear betas, space_timesteps(1000, str(steps)), SpacedDiffusion
    betas = np.linspace(0.0001, 0.02, 1000, dtype=np.float64)
    acp = np.cumprod(1.0 - betas)
    frac_stride = (1000 - 1) / (steps - 1) if steps > 1 else 1
    cur, use = 0.0, set()
    for _ in range(steps):
        use.add(round(cur))
        cur += frac_stride
    last, new_betas, tmap = 1.0, [], []
    for i, a in enumerate(acp):
        if i in use:
            new_betas.append(1 - a / last)
            last = a
            tmap.append(i)
    b = np.array(new_betas)
    al = 1.0 - b
    ac = np.cumprod(al)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = b * (1.0 - ac_prev) / (1.0 - ac)
    post_logvar = np.log(np.append(post_var[1], post_var[1:]))
    coef1 = b * np.sqrt(ac_prev) / (1.0 - ac)
    coef2 = (1.0 - ac_prev) * np.sqrt(al) / (1.0 - ac)
    sr, srm1 = np.sqrt(1.0 / ac), np.sqrt(1.0 / ac - 1)

    def ext(arr, t, shape):
        res = torch.from_numpy(arr)[t].float()
        while res.ndim < len(shape):
            res = res[..., None]
        return res + torch.zeros(shape)

    def forward_with_cfg(x, t, y, cfg_scale):
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)
        model_out = model(combined, t, y=y)
        eps, rest = model_out[:, :3], model_out[:, 3:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        eps = torch.cat([half_eps, half_eps], dim=0)
        return torch.cat([eps, rest], dim=1)

    torch.manual_seed(seed)
    n = len(labels)
    z = torch.randn(n, *latent_shape)
    y = torch.tensor(labels)
    z = torch.cat([z, z], 0)
    y = torch.cat([y, torch.tensor([num_classes] * n)], 0)
    img = z
    with torch.no_grad():
        for i in list(range(steps))[::-1]:
            t = torch.tensor([i] * z.shape[0])
            out = forward_with_cfg(img, torch.tensor(tmap)[t], y, cfg_scale)
            C = img.shape[1]
            eps, var_values = torch.split(out, C, dim=1)
            min_log = ext(post_logvar, t, img.shape)
            max_log = ext(np.log(b), t, img.shape)
            frac = (var_values + 1) / 2
            log_var = frac * max_log + (1 - frac) * min_log
            x0 = ext(sr, t, img.shape) * img - ext(srm1, t, img.shape) * eps
            mean = ext(coef1, t, img.shape) * x0 + ext(coef2, t, img.shape) * img
            noise = torch.randn_like(img)
            mask = (t != 0).float().view(-1, 1, 1, 1)
            img = mean + mask * torch.exp(0.5 * log_var) * noise
    return img.chunk(2, dim=0)[0]


def test_official_convention_matches_transcription_exactly():
    model = _randomise(create_model("DiT-S/2", **TINY, in_channels=4, num_classes=10), seed=1)
    setup = SamplingSetup(model=model, autoencoder=None, diffusion_kwargs={}, source="official")
    labels = [3, 7, 0]
    ours = sample_official(setup, labels, seed=0, steps=6, cfg_scale=4.0)
    ref = _official_reference(model, labels, 10, 6, 4.0, 0, (4, 8, 8))
    assert ours.shape == (3, 4, 8, 8)
    assert torch.equal(ours, ref), f"max diff {(ours - ref).abs().max():.3g}"


def test_official_flat_state_dict(tmp_path):
    """A flat official-style state dict: architecture from the shapes, --model checked against it."""
    model = _randomise(create_model("DiT-S/8", input_size=8, in_channels=3, num_classes=5))
    path = tmp_path / "official.pt"
    torch.save(model.state_dict(), path)
    setup = load_sampling_setup(path, vae="identity")
    assert setup.source == "official" and setup.model_name == "DiT-S/8" and setup.num_classes == 5
    assert setup.defaults["sampler"] == "ddpm" and setup.defaults["steps"] == 250
    with pytest.raises(ValueError, match="weights are a DiT-S/8.*--model DiT-B/8"):
        load_sampling_setup(path, model_name="DiT-B/8", vae="identity")


# ---------------------------------------------------------------- npz
def test_npz_layout_process_independent_and_resumable(ckpt, tmp_path):
    setup = load_sampling_setup(ckpt)
    kw = dict(num_samples=5, batch_size=2, seed=1, sampler="ddim", steps=2, cfg_scale=1.5)
    one = tmp_path / "one.npz"
    assert sample_npz_parts(setup, one, **kw) == [0, 1, 2]
    gather_npz_parts(one, num_samples=5, batch_size=2)
    two = tmp_path / "two.npz"
    assert sample_npz_parts(setup, two, rank=1, world_size=2, **kw) == [1]
    with pytest.raises(ValueError, match="missing"):
        gather_npz_parts(two, num_samples=5, batch_size=2)
    assert sample_npz_parts(setup, two, rank=0, world_size=2, **kw) == [0, 2]
    gather_npz_parts(two, num_samples=5, batch_size=2)
    a, b = np.load(one), np.load(two)
    assert a["arr_0"].dtype == np.uint8 and a["arr_0"].shape == (5, 8, 8, 3)
    assert np.array_equal(a["labels"], np.arange(5) % 4)
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["labels"], b["labels"])
    assert len({a["arr_0"][i].tobytes() for i in range(5)}) == 5  # every index its own sample

    parts = Path(f"{one}.parts")
    (parts / "batch_000001.npz").unlink()
    mtimes = {p.name: p.stat().st_mtime_ns for p in parts.glob("batch_*.npz")}
    assert sample_npz_parts(setup, one, **kw) == [1]  # resume: only the missing batch
    assert {p.name: p.stat().st_mtime_ns for p in parts.glob("batch_*.npz") if p.name in mtimes} == mtimes
    gather_npz_parts(one, num_samples=5, batch_size=2)
    assert np.array_equal(np.load(one)["arr_0"], b["arr_0"])
    with pytest.raises(ValueError, match="other settings.*seed"):
        sample_npz_parts(setup, one, **{**kw, "seed": 2})


def test_tool_npz(ckpt, tmp_path):
    out = tmp_path / "s.npz"
    load_tool("sample").main(["--ckpt", str(ckpt), "--num-samples", "3", "--npz", str(out), "--batch-size", "2",
                               "--steps", "2", "--device", "cpu"])
    d = np.load(out)
    assert d["arr_0"].shape == (3, 8, 8, 3) and d["labels"].tolist() == [0, 1, 2]


# ---------------------------------------------------------------- bad input
def _tool_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        load_tool("sample").main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def test_bad_inputs_have_clear_messages(ckpt, tmp_path, capsys):
    c = ["--ckpt", str(ckpt), "--device", "cpu", "--steps", "2", "--out", str(tmp_path / "x.png")]
    assert "holds a DiT-S/2 model, but --model DiT-B/2" in _tool_error(c + ["--model", "DiT-B/2"], capsys)
    assert "out of range" in _tool_error(c + ["--class-labels", "0,4"], capsys)
    assert "--prompt was given but the model is class-conditional" in _tool_error(c + ["--prompt", "a cat"], capsys)
    assert "does not exist" in _tool_error(["--ckpt", str(tmp_path / "nope.pt")], capsys)
    assert "tools/train.py" in _tool_error([], capsys) and "DiT-XL-2-256x256.pt" in NO_CKPT_MESSAGE
    assert "--image-size 256" in _tool_error(c + ["--image-size", "256"], capsys)
    assert "--num-classes 1000" in _tool_error(c + ["--num-classes", "1000"], capsys)

    four = _our_ckpt(tmp_path / "four.pt", in_channels=4)  # a 4-channel model stored with the identity (3-channel) AE
    assert "3 latent channels" in _tool_error(["--ckpt", str(four), "--device", "cpu"], capsys)

    text = _our_ckpt(tmp_path / "text.pt", name="DiT-S/2-T", text=True)
    err = _tool_error(["--ckpt", str(text), "--device", "cpu", "--class-labels", "1"], capsys)
    assert "--class-labels was given but the model is text-conditional" in err
    with pytest.raises(ValueError, match="neither an integer nor a class name"):
        parse_class_labels("0,zebra", ["red circle"])


def test_unet_checkpoint_samples(tmp_path):
    kwargs = dict(input_size=8, in_channels=3, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                  attention_resolutions=(2,), num_head_channels=8, norm_groups=8, num_classes=3)
    sd = _randomise(create_model("UNet-S", **kwargs)).state_dict()
    path = tmp_path / "unet.pt"
    torch.save({"model": sd, "ema": sd, "model_name": "UNet-S", "model_kwargs": kwargs, "config": {},
                "autoencoder": {"spec": "identity"}, "diffusion": {}, "class_names": [], "text_encoder": None}, path)
    setup = load_sampling_setup(path, model_name="UNet-S")
    img = sample_images(setup, labels=[0, 2], steps=2)
    assert img.shape == (2, 8, 8, 3) and np.asarray(img).std() > 0
    again = sample_images(setup, labels=[0, 2], steps=2)
    assert np.array_equal(np.asarray(img), np.asarray(again))  # seeded: the same images
    other = sample_images(setup, labels=[1, 1], steps=2)
    assert not np.array_equal(np.asarray(img), np.asarray(other))  # the labels reach the UNet


def test_resolve_checkpoint_path_accepts_run_dir_checkpoints_dir_and_latest_pointer(tmp_path):
    from dit.sample import resolve_checkpoint_path

    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    for step in (100, 200):
        (ckpts / f"step_{step:07d}.pt").write_bytes(b"x")
    (ckpts / "latest").write_text("step_0000100.pt\n")  # the pointer decides, not the newest file
    newest = str(ckpts / "step_0000200.pt")
    assert resolve_checkpoint_path(tmp_path / "run") == newest
    assert resolve_checkpoint_path(ckpts) == newest
    assert resolve_checkpoint_path(ckpts / "latest") == str(ckpts / "step_0000100.pt")
    assert resolve_checkpoint_path(ckpts / "step_0000100.pt") == str(ckpts / "step_0000100.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        resolve_checkpoint_path(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_checkpoint_path(tmp_path / "missing.pt")


# ---------------------------------------------------------------- guidance in a limited interval
def _record_calls(model: torch.nn.Module) -> list[tuple[int, list[int]]]:
    """(batch size, t) of every forward call of ``model``."""
    calls: list[tuple[int, list[int]]] = []
    model.register_forward_pre_hook(lambda m, args: calls.append((args[0].shape[0], args[1].tolist())))
    return calls


def test_guidance_interval_ddim_end_to_end(ckpt):
    from dit.diffusion import create_diffusion, guided_fraction
    from dit.sample import guidance_interval_summary, guidance_timestep_interval, sample_latents, sampler_timesteps

    setup = load_sampling_setup(ckpt)
    calls = _record_calls(setup.model)
    cond, uncond = {"y": torch.tensor([0, 3])}, {"y": torch.tensor([4, 4])}
    kw = dict(sampler="ddim", steps=10, cfg_scale=2.0)

    def run(seed, interval):
        calls.clear()
        return sample_latents(setup, cond, uncond, 2, generator=torch.Generator().manual_seed(seed),
                              guidance_interval=interval, **kw)

    a, b = run(0, (0.5, 3.0)), run(0, (0.5, 3.0))
    assert torch.equal(a, b) and not torch.equal(a, run(1, (0.5, 3.0)))  # deterministic for a seed

    run(0, (0.5, 3.0))
    ts = sampler_timesteps(setup, "ddim", 10)
    assert ts == create_diffusion("10", **setup.diffusion_kwargs).timestep_map[::-1]  # original steps, highest first
    assert [t[0] for _, t in calls] == ts  # the model sees original timesteps, not respaced indices
    frac = guided_fraction(ts, guidance_timestep_interval(setup, (0.5, 3.0)))
    doubled = sum(n == 4 for n, _ in calls)
    assert 0 < doubled < 10 and sum(n == 2 for n, _ in calls) == 10 - doubled and len(calls) == 10
    assert doubled == round(frac * 10)
    assert guidance_interval_summary(setup, guidance_interval=(0.5, 3.0), **kw) == \
        f"guidance on {doubled} of 10 steps (sigma in (0.5, 3])"

    plain = sample_latents(setup, cond, uncond, 2, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(run(0, (0.0, float("inf"))), plain)  # an interval holding every step is plain CFG
    assert not torch.equal(a, plain)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_sampler_timesteps_match_diffusers_model_calls(ckpt):
    from dit.sample import sample_latents, sampler_timesteps

    setup = load_sampling_setup(ckpt)
    calls = _record_calls(setup.model)
    for sampler in ("euler", "dpm-solver++"):
        calls.clear()
        sample_latents(setup, {"y": torch.tensor([1])}, None, 1, sampler=sampler, steps=4,
                       generator=torch.Generator().manual_seed(0))
        assert [t[0] for _, t in calls] == sampler_timesteps(setup, sampler, 4)


def test_guidance_interval_config_and_checkpoint_default(tmp_path):
    from dit.config import ConfigError, load_config

    assert load_config(None, ["sample.guidance_interval=[0.3,5.0]"]).sample.guidance_interval == [0.3, 5.0]
    assert load_config(None, ["sample.guidance_interval=[0.3, 5]"]).sample.guidance_interval == [0.3, 5.0]
    assert load_config(None).sample.guidance_interval is None
    for bad in ["[5.0, 0.3]", "[0.3]", "[-1, 2]"]:
        with pytest.raises(ConfigError, match=r"sample.guidance_interval must be two sigmas \[lo, hi\]"):
            load_config(None, [f"sample.guidance_interval={bad}"])
    with pytest.raises(ConfigError, match="sample.guidance_interval must be a list of a float or null"):
        load_config(None, ["sample.guidance_interval=wide"])

    # A checkpoint whose training config set sample.guidance_interval samples with it by default.
    path = _our_ckpt(tmp_path / "gi.pt")
    obj = torch.load(path, weights_only=False)
    obj["config"]["sample"]["guidance_interval"] = [0.5, 3.0]
    torch.save(obj, path)
    setup = load_sampling_setup(path)
    assert setup.defaults["guidance_interval"] == (0.5, 3.0)
    kw = dict(labels=[0, 1], seed=0, steps=10)
    assert np.array_equal(sample_images(setup, **kw), sample_images(setup, guidance_interval=(0.5, 3.0), **kw))
    assert not np.array_equal(sample_images(setup, **kw), sample_images(setup, guidance_interval=(0, np.inf), **kw))


def test_tool_guidance_interval(ckpt, tmp_path, capsys):
    c = ["--ckpt", str(ckpt), "--device", "cpu", "--steps", "3", "--out", str(tmp_path / "x.png")]
    load_tool("sample").main(c + ["--guidance-interval", "0.5,5"])
    out = capsys.readouterr().out
    assert "guidance on 1 of 3 steps (sigma in (0.5, 5])" in out and "saved" in out  # steps 999, 500, 0
    for bad in ["5,1", "abc", "1", "0.1,0.2,0.3", "-1,2", "nan,1"]:
        err = _tool_error(c + [f"--guidance-interval={bad}"], capsys)
        assert err.count("\n") == 1 and "--guidance-interval" in err, err
    err = _tool_error(c + ["--guidance-interval", "1e6,1e7"], capsys)  # above the schedule's largest sigma
    assert "--guidance-interval: no timestep has sigma" in err and err.count("\n") == 1
    err = _tool_error(c + ["--official-cfg", "--guidance-interval", "0.5,3"], capsys)
    assert "--guidance-interval is not supported with the official DiT guidance convention" in err


def tool_grids(ckpt: Path, tmp_path: Path, *flag_sets: list[str]) -> list[np.ndarray]:
    """The fp32 CPU grid (classes 0, 1; 3 steps; same seed) that tools/sample.py writes under each set of extra flags,
    as int arrays, so that a flag's effect on the samples can be compared."""
    grids = []
    for i, extra in enumerate(flag_sets):
        out = tmp_path / f"grid{i}.png"
        load_tool("sample").main(["--ckpt", str(ckpt), "--class-labels", "0,1", "--steps", "3", "--out", str(out),
                                  "--device", "cpu", "--precision", "fp32", *extra])
        grids.append(np.asarray(Image.open(out)).astype(int))
    return grids


def test_tool_compile_gives_the_eager_samples(ckpt, tmp_path):
    # --compile (torch.compile; CUDA graphs on GPU) must not change what is sampled: same seed, same grid up to
    # float rounding in the compiled kernels (uint8 pixels within 1 level almost everywhere).
    from torch._dynamo.utils import counters

    counters.clear()
    grids = tool_grids(ckpt, tmp_path, [], ["--compile"])
    assert counters["stats"]["unique_graphs"] >= 1  # the second run really went through torch.compile
    diff = np.abs(grids[0] - grids[1])
    assert grids[0].std() > 0 and diff.max() <= 2 and (diff > 1).mean() < 0.01


def test_precision_picks_the_autocast_dtype_on_cuda_and_fp8_refuses_fp16(monkeypatch):
    """--precision bf16 / fp16 run the network under that autocast dtype on CUDA and return float32; fp32 (and any
    CPU run) calls the network as is; an unknown name lists the valid ones; --fp8 refuses fp16 (its GEMMs write bf16)."""
    import contextlib

    import dit.sample as S

    seen = []

    @contextlib.contextmanager
    def fake_autocast(device_type, dtype):
        seen.append((device_type, dtype))
        yield

    monkeypatch.setattr(S.torch, "autocast", fake_autocast)
    net = lambda x, t: x.half()  # noqa: E731
    cuda = torch.device("cuda")
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        out = S._autocast_model(net, cuda, name)(torch.ones(2), torch.zeros(2))
        assert seen[-1] == ("cuda", dtype) and out.dtype == torch.float32
    assert S._autocast_model(net, cuda, "fp32") is net and S._autocast_model(net, torch.device("cpu"), "fp16") is net
    with pytest.raises(ValueError, match="--precision: expected one of bf16, fp16, fp32, got 'fp8'"):
        S._autocast_model(net, cuda, "fp8")
    with pytest.raises(ValueError, match="--fp8: runs with --precision bf16"):
        S.float8_for_sampling(None, cuda, precision="fp16")


def test_tool_samples_in_the_precision_the_checkpoint_trained_in(tmp_path, monkeypatch):
    """Without --precision, a checkpoint trained in fp16 (the UNet configs) samples in fp16 and any other in bf16;
    --fp8 (bf16 GEMMs) and --official-cfg (fp32) keep their own; --precision wins."""
    tool = load_tool("sample")
    chosen = []
    monkeypatch.setattr(tool, "sample_images", lambda setup, **kw: chosen.append(kw["precision"]) or np.zeros(
        (1, 4, 4, 3), np.uint8))
    monkeypatch.setattr(tool, "float8_for_sampling", lambda *a, **k: None)
    fp16, bf16 = _our_ckpt(tmp_path / "fp16.pt"), _our_ckpt(tmp_path / "bf16.pt")
    for path, mp in ((fp16, "fp16"), (bf16, "bf16")):
        obj = torch.load(path, weights_only=False)
        obj["config"]["train"] = {"mixed_precision": mp}
        torch.save(obj, path)
    assert load_sampling_setup(fp16).defaults["precision"] == "fp16"
    out = ["--out", str(tmp_path / "g.png"), "--device", "cpu", "--steps", "2"]
    for extra in (["--ckpt", str(fp16)], ["--ckpt", str(bf16)], ["--ckpt", str(fp16), "--fp8"],
                  ["--ckpt", str(fp16), "--official-cfg"], ["--ckpt", str(bf16), "--precision", "fp16"]):
        tool.main(extra + out)
    assert chosen == ["fp16", "bf16", "bf16", "fp32", "fp16"]
