"""Diffusion core: schedules, forward process, posterior, variance parameterisation, losses, respacing.

Reference values are recomputed independently in float64 (closed forms, Bayes' rule, scipy) rather than with the
library's own tables.
"""

import math

import numpy as np
import pytest
import scipy.stats
import torch

from dit.diffusion import (
    GaussianDiffusion,
    SpacedDiffusion,
    create_diffusion,
    discretized_gaussian_log_likelihood,
    get_beta_schedule,
    normal_kl,
    space_timesteps,
)

D64 = torch.float64



def _abar(betas):
    return np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))


def _const_model(out):
    """A model that ignores its inputs and returns a fixed tensor."""
    return lambda x, t, **kw: out


# ----------------------------------------------------------------------------- schedules
def test_linear_schedule_scales_with_steps():
    b = get_beta_schedule("linear", 250)
    assert b.dtype == np.float64 and b.shape == (250,)
    assert b[0] == pytest.approx(4 * 1e-4, rel=1e-12) and b[-1] == pytest.approx(4 * 0.02, rel=1e-12)
    assert np.allclose(np.diff(b), (0.08 - 0.0004) / 249, rtol=1e-9)


def test_cosine_schedule_matches_alpha_bar():
    T = 100
    b = get_beta_schedule("cosine", T)
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # Nichol & Dhariwal eq. 17
    abar = _abar(b)
    # Where the cap is inactive, abar_t = f((t+1)/T) / f(0).
    expect = np.array([f((t + 1) / T) / f(0) for t in range(T)])
    uncapped = b < 0.999
    assert uncapped[:-1].all() and b[-1] == 0.999  # only the last beta is capped
    np.testing.assert_allclose(abar[:-1], expect[:-1], rtol=1e-10)
    np.testing.assert_array_equal(get_beta_schedule("squaredcos_cap_v2", T), b)


def test_scaled_linear_schedule():
    b = get_beta_schedule("scaled_linear", 1000)
    assert b[0] == pytest.approx(0.00085, rel=1e-12) and b[-1] == pytest.approx(0.012, rel=1e-12)
    np.testing.assert_allclose(np.sqrt(b), np.linspace(0.00085**0.5, 0.012**0.5, 1000), rtol=1e-12)
    b2 = get_beta_schedule("scaled_linear", 10, beta_start=0.001, beta_end=0.02)
    assert b2[0] == pytest.approx(0.001) and b2[-1] == pytest.approx(0.02)


def test_schedule_errors():
    with pytest.raises(ValueError, match="linear, cosine, scaled_linear"):
        get_beta_schedule("sigmoid", 10)
    with pytest.raises(ValueError, match="positive integer"):
        get_beta_schedule("linear", 0)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        GaussianDiffusion(betas=get_beta_schedule("linear", 10))  # 10 steps -> beta_end = 2
    with pytest.raises(ValueError, match="prediction"):
        GaussianDiffusion(betas=get_beta_schedule("linear", 100), prediction="score")
    with pytest.raises(ValueError, match="hybrid"):
        GaussianDiffusion(betas=get_beta_schedule("linear", 100), learn_sigma=True, loss="mse")


# ----------------------------------------------------------------------------- forward process
@pytest.fixture(scope="module")
def diff():
    return GaussianDiffusion(betas=get_beta_schedule("linear", 1000))


def test_q_sample_closed_form(diff):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 3, 4, 4, generator=g, dtype=D64)
    noise = torch.randn(5, 3, 4, 4, generator=g, dtype=D64)
    t = torch.tensor([0, 1, 10, 500, 999])
    abar = torch.from_numpy(_abar(diff.betas))[t].view(-1, 1, 1, 1)
    expect = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    torch.testing.assert_close(diff.q_sample(x0, t, noise=noise), expect, rtol=1e-13, atol=1e-13)
    mean, var, log_var = diff.q_mean_variance(x0, t)
    torch.testing.assert_close(mean, abar.sqrt() * x0, rtol=1e-13, atol=0)
    torch.testing.assert_close(var.expand_as(x0), (1 - abar).expand_as(x0), rtol=1e-13, atol=0)
    torch.testing.assert_close(log_var.exp(), var, rtol=1e-12, atol=0)


def test_q_sample_statistics(diff):
    n = 20000
    g = torch.Generator().manual_seed(1)
    for ti, c in [(50, 0.7), (400, -1.3), (900, 2.0)]:
        x0 = torch.full((n, 1), c, dtype=D64)
        xt = diff.q_sample(x0, torch.full((n,), ti), generator=g)
        abar = _abar(diff.betas)[ti]
        var = 1 - abar
        # 6 standard errors: the mean has s.e. sqrt(var/n), the sample variance s.e. var*sqrt(2/(n-1)).
        assert abs(xt.mean().item() - math.sqrt(abar) * c) < 6 * math.sqrt(var / n)
        assert abs(xt.var().item() - var) < 6 * var * math.sqrt(2 / (n - 1))


def test_posterior_matches_bayes(diff):
    """q(x_{t-1} | x_t, x_0) from precision-weighted Bayes' rule equals Ho et al. eq. 6-7 as implemented."""
    g = torch.Generator().manual_seed(2)
    t = torch.tensor([1, 2, 37, 500, 999])
    x0 = torch.randn(5, 2, 3, 3, generator=g, dtype=D64)
    xt = torch.randn(5, 2, 3, 3, generator=g, dtype=D64)
    abar = _abar(diff.betas)
    betas = diff.betas
    mean, var, log_var = diff.q_posterior_mean_variance(x0, xt, t)
    for i, ti in enumerate(t.tolist()):
        a_prev, beta = abar[ti - 1], betas[ti]
        # prior x_{t-1} | x_0 ~ N(sqrt(a_prev) x0, 1 - a_prev); likelihood x_t | x_{t-1} ~ N(sqrt(1-beta) x_{t-1}, beta)
        prec = 1 / (1 - a_prev) + (1 - beta) / beta
        m = (math.sqrt(a_prev) * x0[i] / (1 - a_prev) + math.sqrt(1 - beta) * xt[i] / beta) / prec
        torch.testing.assert_close(mean[i], m, rtol=1e-10, atol=1e-12)
        assert var[i].item() == pytest.approx(1 / prec, rel=1e-10)
        assert log_var[i].item() == pytest.approx(math.log(1 / prec), rel=1e-10)


def test_posterior_variance_clipped_at_t0(diff):
    x0 = torch.zeros(2, 1, dtype=D64)
    _, var, log_var = diff.q_posterior_mean_variance(x0, x0, torch.tensor([0, 1]))
    assert var[0].item() == 0.0  # the true posterior at t = 0 is a point mass
    assert torch.isfinite(log_var).all()
    assert log_var[0].item() == log_var[1].item() == pytest.approx(math.log(diff.posterior_variance[1]), rel=1e-12)
    # Posterior mean at t = 0 is exactly x_0 (coef1 = 1, coef2 = 0).
    mean, _, _ = diff.q_posterior_mean_variance(torch.ones(1, 1, dtype=D64), torch.full((1, 1), 5.0, dtype=D64),
                                                torch.tensor([0]))
    assert mean.item() == pytest.approx(1.0, abs=1e-12)


def test_learned_range_variance(diff):
    """log var = frac log beta_t + (1 - frac) log posterior var (clipped), frac = (v + 1) / 2 (N&D eq. 15)."""
    x = torch.zeros(3, 2, 2, 2, dtype=D64)
    t = torch.tensor([0, 10, 700])
    lo = np.log(np.append(diff.posterior_variance[1], diff.posterior_variance[1:]))[t.numpy()]
    hi = np.log(diff.betas)[t.numpy()]
    for v, frac in [(-1.0, 0.0), (1.0, 1.0), (0.0, 0.5), (0.3, 0.65)]:
        out = torch.cat([torch.zeros_like(x), torch.full_like(x, v)], dim=1)
        res = diff.p_mean_variance(_const_model(out), x, t)
        expect = torch.from_numpy(frac * hi + (1 - frac) * lo).view(-1, 1, 1, 1).expand_as(x)
        torch.testing.assert_close(res["log_variance"], expect, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(res["variance"], expect.exp(), rtol=1e-12, atol=0)


def test_fixed_variances():
    betas = get_beta_schedule("linear", 100)
    x = torch.zeros(2, 1, dtype=D64)
    t = torch.tensor([0, 50])
    large = GaussianDiffusion(betas=betas, learn_sigma=False, loss="mse")
    small = GaussianDiffusion(betas=betas, learn_sigma=False, loss="mse", sigma_small=True)
    pv = betas * (1 - np.append(1, _abar(betas)[:-1])) / (1 - _abar(betas))
    r_large = large.p_mean_variance(_const_model(torch.zeros_like(x)), x, t)
    r_small = small.p_mean_variance(_const_model(torch.zeros_like(x)), x, t)
    assert r_large["variance"].flatten().tolist() == pytest.approx([pv[1], betas[50]], rel=1e-12)
    assert r_small["variance"].flatten().tolist() == pytest.approx([pv[0], pv[50]], rel=1e-12, abs=1e-300)


def test_model_output_shape_errors(diff):
    x = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match="2C"):
        diff.p_mean_variance(_const_model(torch.zeros(2, 3, 4, 4)), x, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="t must have shape"):
        diff.p_mean_variance(_const_model(torch.zeros(2, 6, 4, 4)), x, torch.tensor([1]))


# ----------------------------------------------------------------------------- conversions
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_parameterisation_round_trips(diff, prediction):
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(4, 2, 3, 3, generator=g, dtype=D64)
    eps = torch.randn(4, 2, 3, 3, generator=g, dtype=D64)
    t = torch.tensor([0, 3, 400, 999])
    xt = diff.q_sample(x0, t, noise=eps)
    kw = dict(rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(diff.predict_xstart_from_eps(xt, t, eps), x0, **kw)
    torch.testing.assert_close(diff.predict_eps_from_xstart(xt, t, x0), eps, **kw)
    v = diff.get_v(x0, eps, t)
    torch.testing.assert_close(diff.predict_xstart_from_v(xt, t, v), x0, **kw)
    torch.testing.assert_close(diff.predict_eps_from_v(xt, t, v), eps, **kw)
    # A model that outputs the true target for its parameterisation recovers x_0 and eps exactly.
    d = GaussianDiffusion(betas=diff.betas, prediction=prediction, learn_sigma=False, loss="mse")
    target = {"eps": eps, "x0": x0, "v": v}[prediction]
    out = d.p_mean_variance(_const_model(target), xt, t)
    torch.testing.assert_close(out["pred_xstart"], x0, **kw)
    torch.testing.assert_close(out["eps"], eps, **kw)
    losses = d.training_losses(_const_model(target), x0, t, noise=eps)
    assert losses["mse"].abs().max().item() < 1e-18 and "vb" not in losses


# ----------------------------------------------------------------------------- likelihood terms
def test_normal_kl_direct_and_monte_carlo():
    m1, s1, m2, s2 = 0.3, 0.7, -0.2, 1.4
    kl = normal_kl(torch.tensor(m1, dtype=D64), 2 * math.log(s1), torch.tensor(m2, dtype=D64), 2 * math.log(s2))
    direct = math.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5
    assert kl.item() == pytest.approx(direct, rel=1e-12)
    n = 200_000
    x = m1 + s1 * torch.randn(n, generator=torch.Generator().manual_seed(4), dtype=D64)
    xs = x.numpy()
    log_ratio = torch.from_numpy(scipy.stats.norm.logpdf(xs, m1, s1) - scipy.stats.norm.logpdf(xs, m2, s2))
    se = log_ratio.std().item() / math.sqrt(n)
    assert abs(log_ratio.mean().item() - direct) < 5 * se
    assert normal_kl(torch.tensor(1.0), 0.5, torch.tensor(1.0), 0.5).item() == pytest.approx(0.0, abs=1e-7)


def _scipy_discretized_loglik(x, mean, std):
    x, mean, std = (np.asarray(a, dtype=np.float64) for a in (x, mean, std))
    upper = np.where(x > 0.999, 1.0, scipy.stats.norm.cdf((x + 1 / 255 - mean) / std))
    lower = np.where(x < -0.999, 0.0, scipy.stats.norm.cdf((x - 1 / 255 - mean) / std))
    return np.log(upper - lower)


def test_discretized_gaussian_against_scipy():
    g = torch.Generator().manual_seed(5)
    x = torch.cat([torch.tensor([-1.0, 1.0]), torch.randint(0, 256, (30,), generator=g) / 127.5 - 1]).to(D64)
    means = x + 0.01 * torch.randn(x.shape, generator=g, dtype=D64)
    log_scales = torch.log(torch.full_like(x, 0.01) + 0.02 * torch.rand(x.shape, generator=g, dtype=D64))
    ref = _scipy_discretized_loglik(x, means, log_scales.exp())
    exact = discretized_gaussian_log_likelihood(x, means=means, log_scales=log_scales, exact_cdf=True)
    np.testing.assert_allclose(exact.numpy(), ref, rtol=1e-9, atol=1e-12)
    # ADM's tanh CDF is accurate to ~2e-4 in probability; with bins holding >4% mass that is <1e-2 in log-prob.
    approx = discretized_gaussian_log_likelihood(x, means=means, log_scales=log_scales)
    assert np.exp(ref).min() > 0.04
    np.testing.assert_allclose(approx.numpy(), ref, atol=1e-2)
    assert not np.allclose(approx.numpy(), ref, atol=1e-9)  # it really is the approximation
    with pytest.raises(ValueError, match="one shape"):
        discretized_gaussian_log_likelihood(x, means=means[:3], log_scales=log_scales)


def _learned_output(eps, v):
    return torch.cat([eps, v], dim=1)


def test_vb_term_is_kl_for_t_positive(diff):
    """For t > 0 the VB term equals KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) computed by hand, in bits/dim."""
    g = torch.Generator().manual_seed(6)
    x0 = torch.randn(3, 2, 2, 2, generator=g, dtype=D64).clamp(-1, 1)
    xt = torch.randn(3, 2, 2, 2, generator=g, dtype=D64)
    t = torch.tensor([1, 250, 999])
    eps_hat = torch.randn(3, 2, 2, 2, generator=g, dtype=D64)
    vv = torch.rand(3, 2, 2, 2, generator=g, dtype=D64) * 2 - 1
    out = diff._vb_terms_bpd(_const_model(_learned_output(eps_hat, vv)), x0, xt, t)["output"]
    abar = _abar(diff.betas)
    for i, ti in enumerate(t.tolist()):
        a, a_prev, beta = abar[ti], abar[ti - 1], diff.betas[ti]
        alpha = 1 - beta
        q_mean = (math.sqrt(a_prev) * beta * x0[i] + math.sqrt(alpha) * (1 - a_prev) * xt[i]) / (1 - a)
        q_var = beta * (1 - a_prev) / (1 - a)
        x0_hat = (xt[i] - math.sqrt(1 - a) * eps_hat[i]) / math.sqrt(a)
        p_mean = (math.sqrt(a_prev) * beta * x0_hat + math.sqrt(alpha) * (1 - a_prev) * xt[i]) / (1 - a)
        frac = (vv[i] + 1) / 2
        p_var = torch.exp(frac * math.log(beta) + (1 - frac) * math.log(q_var))
        kl = 0.5 * (torch.log(p_var / q_var) + (q_var + (q_mean - p_mean) ** 2) / p_var - 1)
        assert out[i].item() == pytest.approx(kl.mean().item() / math.log(2), rel=1e-9)


def test_vb_term_at_t0_is_decoder_nll(diff):
    g = torch.Generator().manual_seed(7)
    x0 = (torch.randint(0, 256, (2, 1, 4, 4), generator=g) / 127.5 - 1).to(D64)
    xt = diff.q_sample(x0, torch.tensor([0, 0]), generator=g)
    eps_hat = torch.randn(2, 1, 4, 4, generator=g, dtype=D64) * 0.1
    vv = torch.full_like(x0, 0.5)
    t = torch.tensor([0, 0])
    out = diff._vb_terms_bpd(_const_model(_learned_output(eps_hat, vv)), x0, xt, t)["output"]
    # p(x_0 | x_1): mean = x0_hat (posterior coef1 = 1 at t = 0); variance from the learned range at t = 0.
    a = _abar(diff.betas)[0]
    x0_hat = (xt - math.sqrt(1 - a) * eps_hat) / math.sqrt(a)
    pv1 = diff.betas[1] * (1 - a) / (1 - _abar(diff.betas)[1])
    std = math.exp(0.5 * (0.75 * math.log(diff.betas[0]) + 0.25 * math.log(pv1)))
    ref = -_scipy_discretized_loglik(x0.numpy(), x0_hat.numpy(), std).reshape(2, -1).mean(1) / math.log(2)
    np.testing.assert_allclose(out.numpy(), ref, rtol=2e-3)


def test_hybrid_loss_stop_gradient():
    """Gradients of the VB term reach only the variance channels; the MSE only the prediction channels."""
    d = GaussianDiffusion(betas=get_beta_schedule("linear", 1000))
    g = torch.Generator().manual_seed(8)
    x0 = torch.randn(4, 2, 3, 3, generator=g, dtype=D64)
    noise = torch.randn(4, 2, 3, 3, generator=g, dtype=D64)
    t = torch.tensor([0, 5, 300, 999])
    param = (0.5 * torch.randn(4, 4, 3, 3, generator=g, dtype=D64)).requires_grad_()
    model = lambda x, tt: param * 1.0

    losses = d.training_losses(model, x0, t, noise=noise)
    assert set(losses) == {"loss", "mse", "vb"} and all(v.shape == (4,) for v in losses.values())
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"])
    torch.testing.assert_close(losses["mse"], ((noise - param[:, :2]) ** 2).mean(dim=(1, 2, 3)))
    (grad_vb,) = torch.autograd.grad(losses["vb"].sum(), param, retain_graph=True)
    assert grad_vb[:, :2].abs().max().item() == 0.0
    assert grad_vb[:, 2:].abs().min().item() > 0.0
    (grad_mse,) = torch.autograd.grad(losses["mse"].sum(), param)
    assert grad_mse[:, 2:].abs().max().item() == 0.0 and grad_mse[:, :2].abs().max().item() > 0.0
    # The VB value equals the un-frozen bound term (the stop-gradient changes gradients, not values).
    xt = d.q_sample(x0, t, noise=noise)
    direct = d._vb_terms_bpd(model, x0, xt, t)["output"]
    torch.testing.assert_close(losses["vb"], direct.detach())


def test_vb_rescaled_for_respaced_training():
    d = create_diffusion("100")
    x0 = torch.zeros(2, 1, 2, 2, dtype=D64)
    noise = torch.ones_like(x0)
    t = torch.tensor([3, 50])
    out = torch.cat([torch.zeros_like(x0), torch.full_like(x0, 0.2)], 1)
    vb = d.training_losses(_const_model(out), x0, t, noise=noise)["vb"]
    xt = d.q_sample(x0, t, noise=noise)
    torch.testing.assert_close(vb, 0.1 * d._vb_terms_bpd(_const_model(out), x0, xt, t)["output"])


# ----------------------------------------------------------------------------- respacing
def test_space_timesteps():
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim1") == {0}
    s = space_timesteps(1000, "250")
    assert len(s) == 250 and min(s) == 0 and max(s) == 999
    s = space_timesteps(300, "10,15,20")
    parts = [sorted(x for x in s if lo <= x < lo + 100) for lo in (0, 100, 200)]
    assert [len(p) for p in parts] == [10, 15, 20]
    assert parts[0][0] == 0 and parts[0][-1] == 99 and parts[2][-1] == 299
    assert space_timesteps(10, [10]) == set(range(10))
    with pytest.raises(ValueError, match="ddim600"):
        space_timesteps(1000, "ddim600")
    with pytest.raises(ValueError, match="cannot take 2000"):
        space_timesteps(1000, "2000")
    with pytest.raises(ValueError, match="expected"):
        space_timesteps(1000, "fast")


def test_spaced_diffusion_keeps_alpha_bar_and_maps_timesteps():
    betas = get_beta_schedule("linear", 1000)
    keep = space_timesteps(1000, "ddim50")
    d = SpacedDiffusion(keep, betas=betas)
    assert d.num_timesteps == 50 and d.timestep_map == list(range(0, 1000, 20))
    np.testing.assert_allclose(d.alphas_cumprod, _abar(betas)[d.timestep_map], rtol=1e-12)
    seen = []

    def model(x, t):
        seen.append(t.clone())
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    d.p_mean_variance(model, torch.zeros(3, 1, 2, 2), torch.tensor([0, 1, 49]))
    assert seen[0].tolist() == [0, 20, 980] and seen[0].dtype == torch.int64
    with pytest.raises(ValueError, match="subset"):
        SpacedDiffusion({0, 1000}, betas=betas)


def test_create_diffusion_defaults():
    d = create_diffusion()
    assert d.num_timesteps == 1000 and d.learn_sigma and d.prediction == "eps"
    # Respacing "" keeps every step; betas are recomputed from alpha-bar ratios (as in ADM), so equal up to rounding.
    np.testing.assert_allclose(d.betas, get_beta_schedule("linear", 1000), rtol=1e-11)
    d250 = create_diffusion("250", noise_schedule="cosine")
    assert d250.num_timesteps == 250
    np.testing.assert_allclose(d250.alphas_cumprod, _abar(get_beta_schedule("cosine", 1000))[d250.timestep_map])
    assert create_diffusion(learn_sigma=False).loss_type == "hybrid"  # hybrid with fixed variance = plain MSE
    with pytest.raises(ValueError, match="unknown noise schedule"):
        create_diffusion(noise_schedule="cosinus")
