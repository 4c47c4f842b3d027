"""Gaussian diffusion (DDPM) with ADM's method names and numerics.

Matches OpenAI ADM's ``gaussian_diffusion.py`` as used by facebookresearch/DiT: the same float64 tables, the same order
of floating-point operations and the same order of random draws, so that with one seed the samples are identical.

Notation (Ho et al. 2020): ``abar_t = prod_{s<=t} (1 - beta_s)``; ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``.
Timesteps ``t`` are (N,) int64 indices in ``[0, num_timesteps)``; index 0 is the least noisy step.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np
import torch

from .losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl

PREDICTIONS = ("eps", "x0", "v")
LOSSES = ("hybrid", "mse")

Model = Callable[..., torch.Tensor]


def _resolve_device(model: Any, noise: torch.Tensor | None, device: torch.device | str | None) -> torch.device:
    """Sampling device: explicit ``device``, else the noise's, else the model's parameters', else CPU."""
    if device is not None:
        return torch.device(device)
    if noise is not None:
        return noise.device
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return torch.device("cpu")


def _progress(indices: list[int], progress: bool):
    if not progress:
        return indices
    from tqdm.auto import tqdm

    return tqdm(indices)



def _last_sample(steps: Iterator[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Run a progressive sampling loop to the end and return its final ``sample``."""
    out = None
    for out in steps:
        pass
    return out["sample"]

class GaussianDiffusion:
    """Forward process, posterior, model-parameterised reverse process, losses and DDPM/DDIM samplers.

    Args:
        betas: (T,) noise schedule, 0 < beta <= 1 (see ``schedules.get_beta_schedule``); kept in float64.
        prediction: what the model's first C output channels predict: ``"eps"`` (noise), ``"x0"`` (clean data) or
            ``"v"`` (``sqrt(abar) eps - sqrt(1 - abar) x0``, Salimans & Ho 2022).
        learn_sigma: the model outputs 2C channels, the second C being ``v in [-1, 1]`` that interpolates the log
            variance between the posterior variance and beta_t (Nichol & Dhariwal 2021, eq. 15). Otherwise the
            variance is fixed (``sigma_small``: posterior variance; else beta_t, DiT's/ADM's "fixed large").
        loss: ``"hybrid"``: MSE on the prediction plus, with ``learn_sigma``, the VLB term on the variance
            (``L_hybrid = L_simple + L_vlb``, Nichol & Dhariwal 2021 Sec. 3.1); ``"mse"``: MSE only (fixed variance).
        sigma_small: fixed variance choice when ``learn_sigma=False``.
    """

    def __init__(
        self,
        *,
        betas: np.ndarray | torch.Tensor | list[float],
        prediction: str = "eps",
        learn_sigma: bool = True,
        loss: str = "hybrid",
        sigma_small: bool = False,
    ):
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {', '.join(PREDICTIONS)}, got {prediction!r}")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        if learn_sigma and loss == "mse":
            raise ValueError("learn_sigma=True needs loss='hybrid': the variance channels are trained only by the VLB")
        if isinstance(betas, torch.Tensor):
            betas = betas.detach().cpu().double().numpy()
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) == 0:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        if not np.all((betas > 0) & (betas <= 1)):
            raise ValueError(
                f"betas must lie in (0, 1], got min {betas.min():.3g} max {betas.max():.3g} "
                "(too few steps for the linear schedule?)"
            )
        self.prediction = prediction
        self.learn_sigma = learn_sigma
        self.loss_type = loss
        self.sigma_small = sigma_small
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])

        # Tables in float64 (ADM names). Posterior q(x_{t-1} | x_t, x_0): Ho et al. 2020 eq. 6-7.
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.one_minus_alphas_cumprod = 1.0 - self.alphas_cumprod
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t = 0; its log is clipped to the t = 1 value (ADM).
        self.posterior_log_variance_clipped = (
            np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
            if self.num_timesteps > 1
            else np.array([])
        )
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self.log_betas = np.log(betas)
        # "Fixed large" variance: beta_t, except posterior variance at t = 0 for a better decoder likelihood (ADM).
        self.fixed_large_variance = np.append(self.posterior_variance[1:2], betas[1:])
        self.fixed_large_log_variance = np.log(self.fixed_large_variance)
        self._device_tables: dict[tuple[str, torch.device], torch.Tensor] = {}

    # ------------------------------------------------------------------ tables
    def warm_tables(self, device: torch.device | str) -> None:
        """Create every per-device coefficient table on ``device`` now (``_extract`` makes them lazily), so that a
        ``torch.compile``-d loss finds them instead of tracing their creation."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # keys use the tensors' device, which has an index
            device = torch.device("cuda", torch.cuda.current_device())
        dtype = torch.float32 if device.type == "mps" else torch.float64
        for name, value in vars(self).items():
            if isinstance(value, np.ndarray) and value.ndim == 1 and (name, device) not in self._device_tables:
                self._device_tables[(name, device)] = torch.from_numpy(np.ascontiguousarray(value)).to(device, dtype)

    def _extract(self, name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Table ``name`` at timesteps t: (N,) -> (N, 1, ..., 1) broadcastable against x.

        The float64 value is cast to ``promote_types(x.dtype, float32)``: float32 for float32/bf16/fp16 x (exactly
        what ADM's ``_extract_into_tensor`` gives) and float64 for float64 x (precise tests).
        """
        key = (name, t.device)
        table = self._device_tables.get(key)
        if table is None:
            # MPS has no float64; everything else keeps the double-precision table on the device.
            dtype = torch.float32 if t.device.type == "mps" else torch.float64
            table = torch.from_numpy(np.ascontiguousarray(getattr(self, name))).to(device=t.device, dtype=dtype)
            self._device_tables[key] = table
        res = table[t].to(torch.promote_types(x.dtype, torch.float32))  # (N,)
        return res.view(-1, *([1] * (x.ndim - 1)))

    def _wrap_model(self, model: Model) -> Model:
        """Hook for ``SpacedDiffusion``, which maps respaced indices back to original timesteps."""
        return model

    @staticmethod
    def _check_t(x: torch.Tensor, t: torch.Tensor) -> None:
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape ({x.shape[0]},) to match x {tuple(x.shape)}, got {tuple(t.shape)}")

    # ------------------------------------------------------------------ forward process
    def q_mean_variance(
        self, x_start: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)`` (Ho et al. eq. 4).

        Returns mean (N, ...) and variance, log_variance (N, 1, ..., 1).
        """
        mean = self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
        variance = self._extract("one_minus_alphas_cumprod", t, x_start)
        log_variance = self._extract("log_one_minus_alphas_cumprod", t, x_start)
        return mean, variance, log_variance

    def q_sample(
        self,
        x_start: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample ``x_t ~ q(x_t | x_0)``: x_start (N, ...), t (N,) -> (N, ...)."""
        if noise is None:
            noise = torch.randn(x_start.shape, generator=generator, device=x_start.device, dtype=x_start.dtype)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x_start shape {tuple(x_start.shape)}")
        return (
            self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
            + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start) * noise
        )

    def q_posterior_mean_variance(
        self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``q(x_{t-1} | x_t, x_0)`` (Ho et al. eq. 6-7): mean (N, ...), variance and clipped log variance
        (N, 1, ..., 1), broadcastable against the mean."""
        if x_start.shape != x_t.shape:
            raise ValueError(f"x_start shape {tuple(x_start.shape)} != x_t shape {tuple(x_t.shape)}")
        mean = (
            self._extract("posterior_mean_coef1", t, x_t) * x_start
            + self._extract("posterior_mean_coef2", t, x_t) * x_t
        )
        variance = self._extract("posterior_variance", t, x_t)
        log_variance = self._extract("posterior_log_variance_clipped", t, x_t)
        return mean, variance, log_variance

    # ------------------------------------------------------------------ parameterisation conversions
    def predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """``x_0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)`` (Ho et al. eq. 4 inverted); (N, ...)."""
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t
            - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t) * eps
        )

    def predict_eps_from_xstart(self, x_t: torch.Tensor, t: torch.Tensor, pred_xstart: torch.Tensor) -> torch.Tensor:
        """``eps = (x_t / sqrt(abar) - x_0) / sqrt(1 / abar - 1)``; (N, ...)."""
        return (self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - pred_xstart) / self._extract(
            "sqrt_recipm1_alphas_cumprod", t, x_t
        )

    def get_v(self, x_start: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Velocity target ``v = sqrt(abar) eps - sqrt(1 - abar) x_0`` (Salimans & Ho 2022, Sec. 4); (N, ...)."""
        return (
            self._extract("sqrt_alphas_cumprod", t, x_start) * noise
            - self._extract("sqrt_one_minus_alphas_cumprod", t, x_start) * x_start
        )

    def predict_xstart_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``x_0 = sqrt(abar) x_t - sqrt(1 - abar) v``; (N, ...)."""
        return (
            self._extract("sqrt_alphas_cumprod", t, x_t) * x_t
            - self._extract("sqrt_one_minus_alphas_cumprod", t, x_t) * v
        )

    def predict_eps_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``eps = sqrt(1 - abar) x_t + sqrt(abar) v``; (N, ...)."""
        return (
            self._extract("sqrt_one_minus_alphas_cumprod", t, x_t) * x_t
            + self._extract("sqrt_alphas_cumprod", t, x_t) * v
        )

    # ADM's private names, kept so that code written against ADM/DiT keeps working.
    _predict_xstart_from_eps = predict_xstart_from_eps
    _predict_eps_from_xstart = predict_eps_from_xstart

    # ------------------------------------------------------------------ reverse process
    def p_mean_variance(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = False,
        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        model_kwargs: dict | None = None,
    ) -> dict[str, torch.Tensor]:
        """Apply the model to get ``p(x_{t-1} | x_t)`` and the predicted x_0.

        x: (N, C, ...), t: (N,) int64. The model returns (N, C, ...) or, with learn_sigma, (N, 2C, ...).
        Returns a dict of (N, C, ...) tensors (variances may be (N, 1, ...) when fixed): ``mean``, ``variance``,
        ``log_variance``, ``pred_xstart`` (after ``denoised_fn`` and optional clipping to [-1, 1]),
        ``model_output`` (the raw prediction channels) and ``eps`` (the noise implied by the raw prediction).
        """
        model_kwargs = {} if model_kwargs is None else model_kwargs
        self._check_t(x, t)
        N, C = x.shape[:2]
        model_output = self._wrap_model(model)(x, t, **model_kwargs)
        if self.learn_sigma:
            if model_output.shape != (N, 2 * C, *x.shape[2:]):
                raise ValueError(
                    f"learn_sigma=True expects model output (N, 2C, ...) = {(N, 2 * C, *x.shape[2:])}, "
                    f"got {tuple(model_output.shape)}"
                )
            model_output, model_var_values = torch.split(model_output, C, dim=1)
            # Learned range (Nichol & Dhariwal eq. 15): v in [-1, 1] interpolates log variance in log space.
            min_log = self._extract("posterior_log_variance_clipped", t, x)
            max_log = self._extract("log_betas", t, x)
            frac = (model_var_values + 1) / 2
            model_log_variance = frac * max_log + (1 - frac) * min_log
            model_variance = torch.exp(model_log_variance)
        else:
            if model_output.shape != x.shape:
                raise ValueError(
                    f"learn_sigma=False expects model output shaped like x {tuple(x.shape)}, "
                    f"got {tuple(model_output.shape)}"
                )
            if self.sigma_small:
                model_variance = self._extract("posterior_variance", t, x)
                model_log_variance = self._extract("posterior_log_variance_clipped", t, x)
            else:
                model_variance = self._extract("fixed_large_variance", t, x)
                model_log_variance = self._extract("fixed_large_log_variance", t, x)

        if self.prediction == "eps":
            raw_xstart = self.predict_xstart_from_eps(x, t, model_output)
            eps = model_output
        elif self.prediction == "x0":
            raw_xstart = model_output
            eps = self.predict_eps_from_xstart(x, t, model_output)
        else:
            raw_xstart = self.predict_xstart_from_v(x, t, model_output)
            eps = self.predict_eps_from_v(x, t, model_output)
        pred_xstart = raw_xstart
        if denoised_fn is not None:
            pred_xstart = denoised_fn(pred_xstart)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        model_mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {
            "mean": model_mean,
            "variance": model_variance,
            "log_variance": model_log_variance,
            "pred_xstart": pred_xstart,
            "model_output": model_output,
            "eps": eps,
        }

    # ------------------------------------------------------------------ losses
    def _vb_terms_bpd(
        self,
        model: Model,
        x_start: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = False,
        model_kwargs: dict | None = None,
    ) -> dict[str, torch.Tensor]:
        """One term of the variational bound in bits per dimension: (N,) in ``output``.

        t > 0: ``L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))``; t = 0: decoder NLL
        ``L_0 = -log p(x_0 | x_1)`` under the discretised Gaussian (Ho et al. 2020 eq. 5 and 13).
        """
        true_mean, _, true_log_variance_clipped = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        kl = normal_kl(true_mean, true_log_variance_clipped, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / np.log(2.0)
        log_scales = 0.5 * out["log_variance"]
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=log_scales.expand_as(x_start)
        )
        decoder_nll = mean_flat(decoder_nll) / np.log(2.0)
        return {"output": torch.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses(
        self,
        model: Model,
        x_start: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: dict | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample training losses: x_start (N, C, ...), t (N,) -> dict of (N,) tensors.

        ``mse``: mean squared error of the prediction channels against the target (eps, x0 or v), averaged over
        non-batch dims (Ho et al. L_simple). ``vb`` (learn_sigma + hybrid only): the VLB term computed on a copy of
        the output whose prediction channels are detached, so it trains only the variance (Nichol & Dhariwal
        Sec. 3.1), multiplied by ``num_timesteps / 1000`` as ADM's rescaled MSE does (1 for 1000 steps, i.e. DiT).
        ``loss = mse (+ vb)``.
        """
        model_kwargs = {} if model_kwargs is None else model_kwargs
        self._check_t(x_start, t)
        if noise is None:
            noise = torch.randn(x_start.shape, generator=generator, device=x_start.device, dtype=x_start.dtype)
        x_t = self.q_sample(x_start, t, noise=noise)
        terms: dict[str, torch.Tensor] = {}
        model_output = self._wrap_model(model)(x_t, t, **model_kwargs)
        N, C = x_t.shape[:2]
        if self.learn_sigma:
            if model_output.shape != (N, 2 * C, *x_t.shape[2:]):
                raise ValueError(
                    f"learn_sigma=True expects model output {(N, 2 * C, *x_t.shape[2:])}, "
                    f"got {tuple(model_output.shape)}"
                )
            model_output, model_var_values = torch.split(model_output, C, dim=1)
            # Stop-gradient on the mean: the VLB term must only train the variance channels.
            frozen_out = torch.cat([model_output.detach(), model_var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(
                model=lambda *args, r=frozen_out, **kwargs: r, x_start=x_start, x_t=x_t, t=t, clip_denoised=False
            )["output"]
            terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)
        elif model_output.shape != x_t.shape:
            raise ValueError(
                f"learn_sigma=False expects model output shaped like x {tuple(x_t.shape)}, "
                f"got {tuple(model_output.shape)}"
            )
        if self.prediction == "eps":
            target = noise
        elif self.prediction == "x0":
            target = x_start
        else:
            target = self.get_v(x_start, noise, t)
        terms["mse"] = mean_flat((target - model_output) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    # ------------------------------------------------------------------ ancestral (DDPM) sampling
    def p_sample(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = False,
        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        model_kwargs: dict | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """One ancestral step ``x_{t-1} ~ p(x_{t-1} | x_t)``: x (N, ...), t (N,) -> dict(sample, pred_xstart).

        One standard normal draw shaped like x is always made (masked out where t == 0), as in ADM.
        """
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        nonzero_mask = (t != 0).to(out["mean"].dtype).view(-1, *([1] * (x.ndim - 1)))  # no noise at t == 0
        sample = out["mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop(
        self,
        model: Model,
        shape: tuple[int, ...] | list[int] | torch.Size,
        noise: torch.Tensor | None = None,
        *,
        clip_denoised: bool = False,
        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        model_kwargs: dict | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Ancestral sampling from x_T to x_0: returns the final sample, (N, C, ...) = shape."""
        return _last_sample(self.p_sample_loop_progressive(
            model, shape, noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs,
            device=device, progress=progress, generator=generator))

    def _initial_noise(self, model, shape, noise, device, generator) -> tuple[torch.Tensor, torch.device]:
        if not isinstance(shape, (tuple, list, torch.Size)):
            raise ValueError(f"shape must be a tuple or list of ints, got {type(shape).__name__}")
        device = _resolve_device(model, noise, device)
        if noise is not None:
            if tuple(noise.shape) != tuple(shape):
                raise ValueError(f"noise shape {tuple(noise.shape)} != requested shape {tuple(shape)}")
            return noise.to(device), device
        return torch.randn(tuple(shape), generator=generator, device=device), device

    def _progressive(self, step: Callable[..., dict], model: Model, shape, noise, device, progress, generator,
                     **step_kwargs) -> Iterator[dict[str, torch.Tensor]]:
        """Drive ``step`` (``p_sample`` or ``ddim_sample``) from t = T-1 down to 0, yielding each step's dict.

        The random stream is the official one: the initial noise, then whatever ``step`` draws, step after step.
        """
        img, device = self._initial_noise(model, shape, noise, device, generator)
        for i in _progress(list(range(self.num_timesteps))[::-1], progress):
            t = torch.full((shape[0],), i, dtype=torch.long, device=device)
            with torch.no_grad():
                out = step(model, img, t, generator=generator, **step_kwargs)
            yield out
            img = out["sample"]

    def p_sample_loop_progressive(
        self,
        model: Model,
        shape: tuple[int, ...] | list[int] | torch.Size,
        noise: torch.Tensor | None = None,
        *,
        clip_denoised: bool = False,
        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        model_kwargs: dict | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        generator: torch.Generator | None = None,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Yield ``p_sample``'s dict at every step, from t = T-1 down to 0 (no gradients)."""
        yield from self._progressive(self.p_sample, model, shape, noise, device, progress, generator,
                                     clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs)

    # ------------------------------------------------------------------ DDIM
    def ddim_sample(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = False,
        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        model_kwargs: dict | None = None,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """One DDIM step (Song et al. 2021 eq. 12, sigma from eq. 16 scaled by ``eta``): x (N, ...) -> dict."""
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        # Recompute eps from the (possibly clipped) x_0 so that the step is consistent with it (ADM).
        eps = self.predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = self._extract("alphas_cumprod", t, x)
        alpha_bar_prev = self._extract("alphas_cumprod_prev", t, x)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        nonzero_mask = (t != 0).to(mean_pred.dtype).view(-1, *([1] * (x.ndim - 1)))
        sample = mean_pred + nonzero_mask * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = False,
        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        model_kwargs: dict | None = None,
        eta: float = 0.0,
    ) -> dict[str, torch.Tensor]:
        """Deterministic DDIM inversion step x_t -> x_{t+1} (the ODE run forward in noise level)."""
        if eta != 0.0:
            raise ValueError(f"ddim_reverse_sample is deterministic and needs eta=0.0, got eta={eta}")
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        eps = self.predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar_next = self._extract("alphas_cumprod_next", t, x)
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_next) + torch.sqrt(1 - alpha_bar_next) * eps
        return {"sample": mean_pred, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_loop(
        self,
        model: Model,
        shape: tuple[int, ...] | list[int] | torch.Size,
        noise: torch.Tensor | None = None,
        *,
        clip_denoised: bool = False,
        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        model_kwargs: dict | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """DDIM sampling from x_T to x_0 over this diffusion's steps (respace with ``ddimN``): -> (N, C, ...)."""
        return _last_sample(self.ddim_sample_loop_progressive(
            model, shape, noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs,
            device=device, progress=progress, eta=eta, generator=generator))

    def ddim_sample_loop_progressive(
        self,
        model: Model,
        shape: tuple[int, ...] | list[int] | torch.Size,
        noise: torch.Tensor | None = None,
        *,
        clip_denoised: bool = False,
        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        model_kwargs: dict | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Yield ``ddim_sample``'s dict at every step, from t = T-1 down to 0 (no gradients)."""
        yield from self._progressive(self.ddim_sample, model, shape, noise, device, progress, generator,
                                     clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs,
                                     eta=eta)

    def ddim_reverse_sample_loop(
        self,
        model: Model,
        x: torch.Tensor,
        *,
        clip_denoised: bool = False,
        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        model_kwargs: dict | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """DDIM inversion: data x (N, C, ...) -> x_{T-1} (N, C, ...), the noise that ``ddim_sample_loop`` maps back.

        The forward loop's step at index i moves from noise level abar_i to abar_{i-1}; the inverse of it moves
        from abar_{i-1} to abar_i with the model evaluated at index i-1 (``ddim_reverse_sample(t=i-1)``). The first
        step (data, level 1 -> abar_0) evaluates the model at index 0. The result is at level abar_{T-1}, so
        ``ddim_sample_loop(model, x.shape, noise=<result>)`` reconstructs x up to the ODE discretisation error.
        """
        device = _resolve_device(model, x, device)
        img = x.to(device)
        for i in _progress(list(range(self.num_timesteps)), progress):
            t = torch.full((x.shape[0],), max(i - 1, 0), dtype=torch.long, device=device)
            with torch.no_grad():
                if i == 0:
                    out = self.p_mean_variance(
                        model, img, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
                    )
                    eps = self.predict_eps_from_xstart(img, t, out["pred_xstart"])
                    alpha_bar = self._extract("alphas_cumprod", t, img)
                    img = out["pred_xstart"] * torch.sqrt(alpha_bar) + torch.sqrt(1 - alpha_bar) * eps
                else:
                    img = self.ddim_reverse_sample(
                        model, img, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
                    )["sample"]
        return img
