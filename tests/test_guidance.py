"""Classifier-free guidance wrappers: the standard formula (also in a limited interval) and the official DiT
convention."""

import numpy as np
import pytest
import torch

from dit.diffusion import (classifier_free_guidance, create_diffusion, get_beta_schedule, guided_fraction,
                           official_cfg_forward, sigma_interval_to_timesteps)

D64 = torch.float64
NULL = 10  # the null class of a 10-class toy model


class ToyConditional:
    """out = [a(y) * x + b(t), c(y) * x] with per-class a, c: a learned-sigma-shaped (2C) conditional model."""

    def __init__(self, channels=4):
        g = torch.Generator().manual_seed(0)
        self.a = torch.randn(NULL + 1, channels, generator=g, dtype=D64)
        self.c = torch.randn(NULL + 1, channels, generator=g, dtype=D64)
        self.calls = []

    def __call__(self, x, t, y, tag=None):
        self.calls.append((x.shape[0], tag))
        a = self.a[y].view(*y.shape, -1, 1, 1)
        c = self.c[y].view(*y.shape, -1, 1, 1)
        b = (t.to(D64) / 1000).view(-1, 1, 1, 1)
        return torch.cat([a * x + b, c * x], dim=1)  # (N, 2C, H, W)


def _inputs(n=3):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, 2, 2, generator=g, dtype=D64)
    t = torch.randint(0, 1000, (n,), generator=g)
    y = torch.randint(0, NULL, (n,), generator=g)
    return x, t, y


def test_cfg_formula_is_linear_in_scale():
    model = ToyConditional()
    x, t, y = _inputs()
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, NULL))
    uncond_kwargs = {"y": torch.full_like(y, NULL)}
    out1 = classifier_free_guidance(model, 1.0, uncond_kwargs)(x, t, y=y)
    out0 = classifier_free_guidance(model, 0.0, uncond_kwargs)(x, t, y=y)
    torch.testing.assert_close(out1, cond, rtol=1e-14, atol=1e-14)  # scale 1 = conditional model
    torch.testing.assert_close(out0[:, :4], uncond[:, :4], rtol=1e-14, atol=1e-14)  # scale 0 = unconditional
    s = 4.25
    out = classifier_free_guidance(model, s, uncond_kwargs)(x, t, y=y)
    torch.testing.assert_close(out[:, :4], uncond[:, :4] + s * (cond[:, :4] - uncond[:, :4]), rtol=1e-13, atol=1e-13)
    # Prediction channels default to x's channel count; the variance channels come from the conditional branch.
    torch.testing.assert_close(out[:, 4:], cond[:, 4:], rtol=0, atol=0)
    # pred_channels = all output channels guides the variance values too.
    out_all = classifier_free_guidance(model, s, uncond_kwargs, pred_channels=8)(x, t, y=y)
    torch.testing.assert_close(out_all, uncond + s * (cond - uncond), rtol=1e-13, atol=1e-13)


def test_cfg_one_batched_call_and_kwargs():
    model = ToyConditional()
    x, t, y = _inputs(3)
    guided = classifier_free_guidance(model, 2.0, {"y": torch.tensor([NULL])})  # size-1 null broadcast to N
    model.calls.clear()
    out = guided(x, t, y=y, tag="keep")
    assert model.calls == [(6, "keep")]  # one call on the doubled batch; non-tensor kwargs pass through
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, NULL))
    torch.testing.assert_close(out[:, :4], uncond[:, :4] + 2.0 * (cond[:, :4] - uncond[:, :4]))
    with pytest.raises(ValueError, match="uncond_kwargs"):
        classifier_free_guidance(model, 2.0, {"y": torch.full((2,), NULL)})(x, t, y=y)
    with pytest.raises(ValueError, match="does not pass"):
        classifier_free_guidance(model, 2.0, {"z": torch.zeros(3)})(x, t, y=y)
    with pytest.raises(ValueError, match="guidance scale"):
        classifier_free_guidance(model, "4", {"y": y})


def _literal_forward_with_cfg(model, x, t, y, cfg_scale):
    """facebookresearch/DiT ``DiT.forward_with_cfg``, transcribed literally."""
    half = x[: len(x) // 2]
    combined = torch.cat([half, half], dim=0)
    model_out = model(combined, t, y)
    eps, rest = model_out[:, :3], model_out[:, 3:]
    cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    eps = torch.cat([half_eps, half_eps], dim=0)
    return torch.cat([eps, rest], dim=1)


def test_official_cfg_matches_literal_forward_with_cfg():
    model = ToyConditional()
    x, t, y = _inputs(3)
    x2 = torch.cat([x, torch.randn_like(x)], 0)  # the second half of x is ignored by the official code
    t2 = torch.cat([t, t], 0)
    y2 = torch.cat([y, torch.full_like(y, NULL)], 0)
    out = official_cfg_forward(model, 4.0)(x2, t2, y=y2)
    ref = _literal_forward_with_cfg(model, x2, t2, y2, 4.0)
    assert torch.equal(out, ref)
    # Only channels :3 are guided; channel 3 (the 4th eps channel) and the variance values stay per half.
    raw = model(torch.cat([x, x], 0), t2, y2)
    assert torch.equal(out[:, 3:], raw[:, 3:])
    assert not torch.equal(out[:3, :3], raw[:3, :3])
    torch.testing.assert_close(out[:3, :3], out[3:, :3], rtol=0, atol=0)
    with pytest.raises(ValueError, match="doubled"):
        official_cfg_forward(model, 4.0)(x, t, y=y)


def test_official_cfg_sampling_recipe_reproduces_official_loop():
    """The documented recipe (doubled noise, doubled labels, keep the first half) equals sampling with the literal
    forward_with_cfg through the same loop, bit for bit, and differs from the standard all-channel guidance."""
    model = ToyConditional(channels=4)

    def learned_sigma_model(x, t, y):  # squash the variance values into [-1, 1]
        out = model(x, t, y)
        return torch.cat([out[:, :4], torch.tanh(out[:, 4:])], 1)

    d = create_diffusion("10")
    n = 2
    z = torch.randn(n, 4, 2, 2, generator=torch.Generator().manual_seed(3)).to(D64)
    y = torch.tensor([1, 7])
    z2, y2 = torch.cat([z, z], 0), torch.cat([y, torch.full_like(y, NULL)], 0)
    torch.manual_seed(0)
    ours = d.p_sample_loop(official_cfg_forward(learned_sigma_model, 1.5), z2.shape, z2, model_kwargs={"y": y2})
    torch.manual_seed(0)
    ref = d.p_sample_loop(
        lambda x, t, y, cfg_scale: _literal_forward_with_cfg(learned_sigma_model, x, t, y, cfg_scale),
        z2.shape, z2, model_kwargs={"y": y2, "cfg_scale": 1.5},
    )
    assert torch.equal(ours, ref)
    torch.manual_seed(0)
    standard = d.p_sample_loop(
        classifier_free_guidance(learned_sigma_model, 1.5, {"y": torch.full_like(y, NULL)}), z.shape, z,
        model_kwargs={"y": y},
    )
    assert not torch.allclose(ours[:n], standard)


# ---------------------------------------------------------------- guidance in a limited interval (arXiv:2404.07724)
def _plain_reference(model, x, t, y, scale, k=4):
    """Plain CFG written out: one doubled call, ``u + s (c - u)`` on the first k channels, the rest conditional."""
    out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, NULL)]))
    c, u = out[: len(x)], out[len(x):]
    return torch.cat([u[:, :k] + scale * (c[:, :k] - u[:, :k]), c[:, k:]], dim=1)


def test_interval_none_and_covering_all_steps_equal_plain_cfg():
    model = ToyConditional()
    x, t, y = _inputs(4)
    uncond = {"y": torch.full_like(y, NULL)}
    ref = _plain_reference(model, x, t, y, 3.0)
    assert torch.equal(classifier_free_guidance(model, 3.0, uncond)(x, t, y=y), ref)
    assert torch.equal(classifier_free_guidance(model, 3.0, uncond, interval=None)(x, t, y=y), ref)
    for interval in [(-1, 999), (float("-inf"), float("inf")), [int(t.min()) - 1, int(t.max())]]:
        model.calls.clear()
        assert torch.equal(classifier_free_guidance(model, 3.0, uncond, interval=interval)(x, t, y=y), ref)
        assert model.calls == [(8, None)]


def test_interval_excluding_the_batch_runs_the_conditional_model_alone():
    model = ToyConditional()
    x, _, y = _inputs(3)
    t = torch.tensor([600, 800, 999])
    guided = classifier_free_guidance(model, 3.0, {"y": torch.full_like(y, NULL)}, interval=(100, 500))
    model.calls.clear()
    out = guided(x, t, y=y, tag="k")
    assert model.calls == [(3, "k")]  # batch N, not 2N
    assert torch.equal(out, model(x, t, y))  # every channel conditional, scale ignored
    t_low = torch.tensor([0, 50, 100])  # lo is exclusive: t = 100 is outside (100, 500]
    model.calls.clear()
    assert torch.equal(guided(x, t_low, y=y), model(x, t_low, y))
    assert model.calls[0] == (3, None)


def test_interval_mixed_batch_selects_rows():
    model = ToyConditional()
    x, _, y = _inputs(5)
    t = torch.tensor([100, 101, 500, 501, 300])  # inside (100, 500]: rows 1, 2, 4 (lo exclusive, hi inclusive)
    guided = classifier_free_guidance(model, 2.5, {"y": torch.full_like(y, NULL)}, interval=(100, 500))
    model.calls.clear()
    out = guided(x, t, y=y)
    assert model.calls == [(10, None)]  # one doubled call
    plain, cond = _plain_reference(model, x, t, y, 2.5), model(x, t, y)
    inside = torch.tensor([False, True, True, False, True])
    assert torch.equal(out[inside], plain[inside])
    assert torch.equal(out[~inside], cond[~inside])
    assert not torch.equal(plain[~inside], cond[~inside])  # the selection is visible


@pytest.mark.parametrize("bad", [(5, 1), (3, 3), (1,), (1, 2, 3), "ab", (True, 2), (float("nan"), 1), 7])
def test_interval_validation(bad):
    with pytest.raises(ValueError, match="guidance interval must be two numbers"):
        classifier_free_guidance(ToyConditional(), 2.0, {}, interval=bad)


def test_guided_callable_receives_original_timesteps_under_respacing():
    """SpacedDiffusion maps respaced indices before calling the (guided) callable, so intervals are in original
    timesteps: the recorded t are ``timestep_map`` (reversed), never the respaced indices 0..9."""
    seen = []

    def model(x, t, y):
        seen.append(t.tolist())
        return torch.zeros(x.shape[0], 8, *x.shape[2:], dtype=x.dtype)

    d = create_diffusion("10")
    y = torch.tensor([1, 2])
    guided = classifier_free_guidance(model, 2.0, {"y": torch.full_like(y, NULL)}, interval=(300, 700))
    d.ddim_sample_loop(guided, (2, 4, 2, 2), torch.zeros(2, 4, 2, 2), model_kwargs={"y": y})
    expected = d.timestep_map[::-1]
    assert [ts[0] for ts in seen] == expected and max(expected) == 999
    assert [len(ts) for ts in seen] == [4 if 300 < s <= 700 else 2 for s in expected]


def _sigmas(name):
    abar = np.cumprod(1.0 - get_beta_schedule(name, 1000))
    return abar, np.sqrt((1.0 - abar) / abar)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_sigma_interval_to_timesteps_matches_brute_force(name):
    abar, sigma = _sigmas(name)
    assert np.all(np.diff(sigma) > 0)
    ts = np.arange(1000)
    g = np.random.default_rng(0)
    pairs = [(0.28, 5.42), (0.0, float("inf")), (sigma[200], sigma[600]), (sigma[0], sigma[999]),
             (np.nextafter(sigma[200], -np.inf), np.nextafter(sigma[600], -np.inf)),
             (np.nextafter(sigma[200], np.inf), np.nextafter(sigma[600], np.inf))]
    pairs += [tuple(sorted(np.exp(g.uniform(np.log(sigma[0]), np.log(sigma[-1]), 2)))) for _ in range(50)]
    for lo, hi in pairs:
        inside = (lo < sigma) & (sigma <= hi)
        if not inside.any():
            continue
        t_lo, t_hi = sigma_interval_to_timesteps(abar, lo, hi)
        assert isinstance(t_lo, int) and isinstance(t_hi, int)
        assert np.array_equal((t_lo < ts) & (ts <= t_hi), inside), (lo, hi)
    # The boundary convention, spelled out: sigma_lo excludes its own step, sigma_hi includes its own.
    assert sigma_interval_to_timesteps(abar, sigma[200], sigma[600]) == (200, 600)
    assert sigma_interval_to_timesteps(abar, np.nextafter(sigma[200], -np.inf), sigma[600]) == (199, 600)
    assert sigma_interval_to_timesteps(abar, sigma[200], np.nextafter(sigma[600], -np.inf)) == (200, 599)
    assert sigma_interval_to_timesteps(abar, 0.0, float("inf")) == (-1, 999)
    # Tensors and the diffusion's own table give the same answer.
    d = create_diffusion(noise_schedule=name)
    assert sigma_interval_to_timesteps(torch.from_numpy(d.alphas_cumprod), 0.28, 5.42) == \
        sigma_interval_to_timesteps(abar, 0.28, 5.42)
    with pytest.raises(ValueError, match="no timestep has sigma"):
        sigma_interval_to_timesteps(abar, sigma[200], np.nextafter(sigma[201], -np.inf))
    with pytest.raises(ValueError, match="lo < hi"):
        sigma_interval_to_timesteps(abar, 5.0, 1.0)
    with pytest.raises(ValueError, match="strictly decreasing"):
        sigma_interval_to_timesteps(abar[::-1], 0.3, 5.0)


def test_guided_fraction():
    ts = [999, 501, 500, 300, 101, 100, 0]
    assert guided_fraction(ts, (100, 500)) == 3 / 7
    assert guided_fraction(torch.tensor(ts), (100, 500)) == 3 / 7
    assert guided_fraction(ts, None) == 1.0
    assert guided_fraction(ts, (-1, 999)) == 1.0
    with pytest.raises(ValueError, match="guidance interval"):
        guided_fraction(ts, (500, 100))
