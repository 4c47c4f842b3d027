"""Samplers: official random-draw order, DDIM determinism and inversion, and sampling correctness with oracle models."""

import math

import numpy as np
import pytest
import torch

from dit.diffusion import SpacedDiffusion, create_diffusion, get_beta_schedule, sample_with_diffusers

D64 = torch.float64
# diffusers builds numpy arrays from torch tensors in a way numpy 2 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
MU, STD = 0.5, 0.3  # toy data distribution N(MU, STD^2) per coordinate



def _gaussian_oracle(learn_sigma=False, var_value=0.0, data_std=STD):
    """The exact eps-prediction E[eps | x_t] for data N(MU, data_std^2); t are original indices of 1000 linear steps.

    x_t = sqrt(a) x0 + sqrt(1-a) eps is jointly Gaussian with eps, so
    E[eps | x_t] = sqrt(1-a) (x_t - sqrt(a) MU) / (a data_std^2 + 1 - a).
    """
    abar = torch.from_numpy(np.cumprod(1 - get_beta_schedule("linear", 1000)))

    def model(x, t, **kw):
        a = abar[t].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        eps = (1 - a).sqrt() * (x - a.sqrt() * MU) / (a * data_std**2 + 1 - a)
        if learn_sigma:
            return torch.cat([eps, torch.full_like(eps, var_value)], dim=1)
        return eps

    return model


def _toy_net(seed=0, channels=3):
    """A small fixed nonlinear function of (x, t) with 2C outputs, like a learned-sigma model."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(2 * channels, channels, generator=g) * 0.3

    def model(x, t, **kw):
        h = torch.einsum("oc,nchw->nohw", w, x)
        return torch.tanh(h + (t.float() / 1000.0).view(-1, 1, 1, 1))

    return model


# ----------------------------------------------------------------------------- official draw order
def _official_p_sample_loop(model, shape, noise, respacing):
    """A literal transcription of ADM/DiT's SpacedDiffusion + p_sample_loop (learned range variance, eps).

    Tables in float64 numpy, coefficients extracted as float32 (``th.from_numpy(arr)[t].float()``), one global
    ``randn_like`` per step.
    """
    base_betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    base_abar = np.cumprod(1.0 - base_betas, axis=0)
    use = sorted(respacing)
    last, new_betas = 1.0, []
    for i, a in enumerate(base_abar):
        if i in respacing:
            new_betas.append(1 - a / last)
            last = a
    betas = np.array(new_betas)
    alphas_cumprod = np.cumprod(1.0 - betas, axis=0)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    sqrt_recip = np.sqrt(1.0 / alphas_cumprod)
    sqrt_recipm1 = np.sqrt(1.0 / alphas_cumprod - 1)
    post_var = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    post_log_var = np.log(np.append(post_var[1], post_var[1:]))
    coef1 = betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    coef2 = (1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod)

    def ext(arr, t, bshape):
        res = torch.from_numpy(arr)[t].float()
        while len(res.shape) < len(bshape):
            res = res[..., None]
        return res + torch.zeros(bshape)

    img = noise if noise is not None else torch.randn(*shape)
    for i in list(range(len(betas)))[::-1]:
        t = torch.tensor([i] * shape[0])
        with torch.no_grad():
            map_tensor = torch.tensor(use, dtype=t.dtype)
            out = model(img, map_tensor[t])
            C = img.shape[1]
            eps, var_values = torch.split(out, C, dim=1)
            min_log = ext(post_log_var, t, img.shape)
            max_log = ext(np.log(betas), t, img.shape)
            frac = (var_values + 1) / 2
            log_var = frac * max_log + (1 - frac) * min_log
            pred_x0 = ext(sqrt_recip, t, img.shape) * img - ext(sqrt_recipm1, t, img.shape) * eps
            mean = ext(coef1, t, img.shape) * pred_x0 + ext(coef2, t, img.shape) * img
            noise_i = torch.randn_like(img)
            mask = (t != 0).float().view(-1, *([1] * (len(img.shape) - 1)))
            img = mean + mask * torch.exp(0.5 * log_var) * noise_i
    return img


def test_p_sample_loop_matches_official_draw_order():
    d = create_diffusion("25")
    model = _toy_net()
    shape = (4, 3, 8, 8)
    torch.manual_seed(123)
    ref = _official_p_sample_loop(model, shape, None, set(d.timestep_map))
    torch.manual_seed(123)
    ours = d.p_sample_loop(model, shape)
    assert torch.equal(ours, ref)
    # A private generator seeded the same way gives the same stream as the seeded global RNG.
    torch.manual_seed(999)
    ours_g = d.p_sample_loop(model, shape, generator=torch.Generator().manual_seed(123))
    assert torch.equal(ours_g, ref)
    # Given noise: only the per-step draws come from the RNG.
    z = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(7)
    ref_z = _official_p_sample_loop(model, shape, z, set(d.timestep_map))
    torch.manual_seed(7)
    assert torch.equal(d.p_sample_loop(model, shape, z), ref_z)


def test_loop_input_errors():
    d = create_diffusion("10")
    with pytest.raises(ValueError, match="noise shape"):
        d.p_sample_loop(_toy_net(), (2, 3, 4, 4), torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="eta=0"):
        d.ddim_reverse_sample(_toy_net(), torch.zeros(1, 3, 4, 4), torch.tensor([0]), eta=0.5)


# ----------------------------------------------------------------------------- DDIM
def test_ddim_eta0_is_deterministic():
    d = create_diffusion("ddim20")
    model = _toy_net(1)
    z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    a = d.ddim_sample_loop(model, z.shape, z)
    torch.manual_seed(1)
    b = d.ddim_sample_loop(model, z.shape, z)
    assert torch.equal(a, b)
    c = d.ddim_sample_loop(model, z.shape, z, eta=1.0, generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(a, c)


def test_ddim_inversion_round_trip():
    model = _gaussian_oracle(learn_sigma=True)
    x0 = MU + STD * torch.randn(64, 2, 1, 1, generator=torch.Generator().manual_seed(0), dtype=D64)
    errs = []
    for steps in (50, 250):
        d = create_diffusion(f"ddim{steps}")
        z = d.ddim_reverse_sample_loop(model, x0)
        assert abs(z.std().item() - 1) < 0.1  # the inverted latent looks like standard normal noise
        back = d.ddim_sample_loop(model, x0.shape, z)
        errs.append((back - x0).abs().max().item())
    # DDIM is a first-order ODE solver: 5x the steps cuts the round-trip error about 5x (measured 0.15 -> 0.033).
    assert errs[1] < 0.05 and errs[1] < errs[0] / 3, errs


# ----------------------------------------------------------------------------- oracle correctness
def _check_gaussian(samples, tol_mean, tol_std):
    assert abs(samples.mean().item() - MU) < tol_mean, samples.mean().item()
    assert abs(samples.std().item() - STD) < tol_std, samples.std().item()


def test_ddpm_samples_gaussian_data():
    n = 4096
    # Standard errors with n*2 values: mean 0.3/sqrt(8192) = 0.0033, std 0.3/sqrt(2*8192) = 0.0023.
    z = torch.randn(n, 2, 1, 1, generator=torch.Generator().manual_seed(1), dtype=D64)
    for sigma_small in (False, True):
        d = create_diffusion("", learn_sigma=False, sigma_small=sigma_small)
        out = d.p_sample_loop(_gaussian_oracle(), z.shape, z, generator=torch.Generator().manual_seed(2))
        _check_gaussian(out, 0.02, 0.02)


def test_ddim_samples_gaussian_and_point_mass():
    n = 4096
    z = torch.randn(n, 2, 1, 1, generator=torch.Generator().manual_seed(3), dtype=D64)
    d = create_diffusion("ddim50")
    out = d.ddim_sample_loop(_gaussian_oracle(learn_sigma=True), z.shape, z)
    # For Gaussian data DDIM is linear in the centred state y = x - sqrt(abar) MU: each step multiplies y by
    # (sqrt(a' a) s^2 + sqrt((1 - a')(1 - a))) / (a s^2 + 1 - a) (Song et al. eq. 12 with the exact eps).
    a, a_prev = d.alphas_cumprod, d.alphas_cumprod_prev
    factor = np.prod((np.sqrt(a_prev * a) * STD**2 + np.sqrt((1 - a_prev) * (1 - a))) / (a * STD**2 + 1 - a))
    expect = MU + factor * (z - math.sqrt(a[-1]) * MU)
    torch.testing.assert_close(out, expect, rtol=1e-10, atol=1e-10)
    # The exact ODE would give std STD; DDIM (first order) shrinks it by 8% in 50 steps and by 1.8% in 250.
    assert 0.90 < factor * math.sqrt(a[-1] * STD**2 + 1 - a[-1]) / STD < 0.93
    out = create_diffusion("ddim250").ddim_sample_loop(_gaussian_oracle(learn_sigma=True), z.shape, z)
    _check_gaussian(out, 0.01, 0.01)
    # Point mass at MU: data std -> 0, every sample lands on MU.
    out = d.ddim_sample_loop(_gaussian_oracle(learn_sigma=True, data_std=0.0), z.shape, z)
    assert (out - MU).abs().max().item() < 1e-6
    # Learned-sigma DDPM with a mid-range variance on the point mass also lands there (variance at t=0 is tiny).
    d25 = create_diffusion("25")
    out = d25.p_sample_loop(_gaussian_oracle(True, 0.0, 0.0), z.shape, z, generator=torch.Generator().manual_seed(0))
    assert (out - MU).abs().max().item() < 0.05


# ----------------------------------------------------------------------------- diffusers samplers
def test_diffusers_samplers_on_gaussian_oracle():
    n = 4096
    z = torch.randn(n, 2, 1, 1, generator=torch.Generator().manual_seed(4))
    d = create_diffusion("")
    # Unit-variance data (like scaled VAE latents). Measured std ratios: DPM++ 20 steps 0.999, Euler 100 steps 0.98.
    oracle = _gaussian_oracle(learn_sigma=True, var_value=0.3, data_std=1.0)
    for name, steps, tol in [("dpmsolver++", 20, 0.02), ("euler", 100, 0.03)]:
        out = sample_with_diffusers(oracle, d, name, steps, z.shape, z)
        assert out.shape == z.shape and torch.isfinite(out).all()
        assert abs(out.mean().item() - MU) < 0.02 and abs(out.std().item() - 1.0) < tol, (name, out.std().item())
    # Narrow data is harder at low noise; uniform log-SNR steps (DPM-Solver's logSNR spacing) keep 20 steps accurate.
    out = sample_with_diffusers(_gaussian_oracle(learn_sigma=True), d, "dpmsolver++", 20, z.shape, z,
                                scheduler_kwargs={"use_lu_lambdas": True})
    _check_gaussian(out, 0.01, 0.01)


def test_diffusers_euler_is_ddim_in_sigma_space():
    """Euler on the probability-flow ODE in (sigma, x / sqrt(abar)) is DDIM (Karras et al. 2022, Sec. 3)."""
    z = torch.randn(64, 2, 1, 1, generator=torch.Generator().manual_seed(6))
    model = _gaussian_oracle(learn_sigma=True)
    theirs = sample_with_diffusers(model, get_beta_schedule("linear", 1000), "euler", 25, z.shape, z)
    trailing = set(range(999, 0, -40))  # diffusers' "trailing" integer timesteps for 25 of 1000 steps
    ours = SpacedDiffusion(trailing, betas=get_beta_schedule("linear", 1000)).ddim_sample_loop(model, z.shape, z)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


def test_diffusers_ddim_matches_our_ddim():
    """diffusers' DDIM on our betas (leading spacing, final alpha-bar 1) takes the same steps as ADM's ``ddim50``."""
    z = torch.randn(8, 2, 1, 1, generator=torch.Generator().manual_seed(5))
    model = _gaussian_oracle()
    seen = []

    def recording(x, t, **kw):
        seen.append(t[0].item())
        return model(x, t)

    ours = create_diffusion("ddim50", learn_sigma=False).ddim_sample_loop(model, z.shape, z)
    theirs = sample_with_diffusers(recording, get_beta_schedule("linear", 1000), "ddim", 50, z.shape, z)
    assert seen == list(range(980, -1, -20))
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


def test_diffusers_samplers_run_with_learned_sigma_and_check_names():
    model = _toy_net(2)
    d = create_diffusion("250")  # respaced: the scheduler must still use the original 1000-step schedule
    for name in ("dpmsolver++", "euler", "ddim"):
        seen = []

        def recording(x, t, **kw):
            seen.append(t)
            return model(x, t)

        out = sample_with_diffusers(recording, d, name, 5, (2, 3, 8, 8), generator=torch.Generator().manual_seed(0))
        assert out.shape == (2, 3, 8, 8) and torch.isfinite(out).all()
        ts = torch.stack(seen)
        # Integer timesteps on the original 0..999 scale (ddim's "leading" spacing starts at 800 for 5 steps).
        assert ts.dtype == torch.int64 and ts.min() >= 0 and ts.max() <= 999 and ts.max() >= 800
    with pytest.raises(ValueError, match="dpmsolver\\+\\+, euler, ddim"):
        sample_with_diffusers(model, d, "heun", 5, (1, 3, 4, 4))
    with pytest.raises(ValueError, match="num_steps"):
        sample_with_diffusers(model, d, "euler", 0, (1, 3, 4, 4))
