"""Flow-matching time: the training timestep samplers and FLUX's sampling schedule.

Convention (rectified flow, as FLUX): t=0 is data, t=1 is noise,
x_t = (1 - t) x0 + t n, velocity target v = n - x0.
"""
from __future__ import annotations

import math

import torch

# FLUX's resolution shift: mu linear in the number of image tokens,
# from (256 tokens, 0.5) to (4096 tokens, 1.15).
BASE_SEQ_LEN, MAX_SEQ_LEN = 256, 4096
BASE_SHIFT, MAX_SHIFT = 0.5, 1.15

SAMPLERS = ("uniform", "logit_normal", "flux_shift", "sigmoid", "shift", "mode")
LOSS_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")
# sigma_sqrt's weight 1/t^2 is unbounded at t -> 0; diffusers' and kohya's trainers draw sigma from a
# 1000-step discrete schedule whose smallest sigma is 1/1000, so t is clamped there (weight <= 1e6).
SIGMA_SQRT_MIN_T = 1e-3
# SD3's mode sampler is a monotone map of [0, 1] onto itself only for scales in [-1, 2 / (pi - 2)]
# (arXiv:2403.03206, eq. 20); outside, t leaves [0, 1].
MODE_SCALE_RANGE = (-1.0, 2.0 / (math.pi - 2.0))


def shift_mu(image_seq_len: int, base_seq_len: int = BASE_SEQ_LEN, max_seq_len: int = MAX_SEQ_LEN,
             base_shift: float = BASE_SHIFT, max_shift: float = MAX_SHIFT) -> float:
    """mu for a sequence of `image_seq_len` image tokens (linear interpolation, extrapolated)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (image_seq_len - base_seq_len)


def time_shift(t: torch.Tensor, mu: float, sigma: float = 1.0) -> torch.Tensor:
    """exp(mu) / (exp(mu) + (1/t - 1)^sigma); maps 0 -> 0 and 1 -> 1, pushes mass towards noise."""
    t = torch.as_tensor(t)
    out = math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0) ** sigma)
    return torch.where(t <= 0, torch.zeros_like(out), out)


def sample_timesteps(kind: str, batch: int, *, generator: torch.Generator | None = None,
                     image_seq_len: int | None = None, mean: float = 0.0, std: float = 1.0,
                     scale: float = 1.0, shift: float = 3.0, mode_scale: float = 1.29,
                     device=None) -> torch.Tensor:
    """Draw `batch` training timesteps in [0, 1] (float32); each kind draws `batch` values from `generator`.

    uniform: the torchtitan/MLPerf reference. logit_normal: sigmoid(N(mean, std)), as SD3.
    flux_shift: uniform pushed through FLUX's resolution-dependent time shift.
    sigmoid: sigmoid(scale * N(0, 1)), kohya sd-scripts' (logit_normal with mean 0, std `scale`).
    shift: the sigmoid sampler's t through the fixed shift s*t / (1 + (s-1)*t), as kohya's `shift`
    (SD3's shift=3 schedule): s > 1 pushes t towards noise.
    mode: SD3's mode sampling, 1 - u - mode_scale * (cos^2(pi u / 2) - 1 + u) for uniform u.
    """
    if kind == "uniform":
        return torch.rand(batch, generator=generator, device=device)
    if kind == "logit_normal":
        return torch.sigmoid(mean + std * torch.randn(batch, generator=generator, device=device))
    if kind == "flux_shift":
        if image_seq_len is None:
            raise ValueError("the flux_shift sampler needs the number of image tokens")
        u = torch.rand(batch, generator=generator, device=device)
        return time_shift(u, shift_mu(image_seq_len))
    if kind in ("sigmoid", "shift"):
        t = torch.sigmoid(scale * torch.randn(batch, generator=generator, device=device))
        return t if kind == "sigmoid" else fixed_shift(t, shift)
    if kind == "mode":
        return mode_time(torch.rand(batch, generator=generator, device=device), mode_scale)
    raise ValueError(f"unknown timestep sampler {kind!r}; choose one of {', '.join(SAMPLERS)}")


def fixed_shift(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's fixed time shift s*t / (1 + (s-1)*t) (diffusers' FlowMatchEulerDiscreteScheduler(shift=s))."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def mode_time(u: torch.Tensor, mode_scale: float) -> torch.Tensor:
    """SD3's f_mode(u) = 1 - u - s (cos^2(pi u / 2) - 1 + u): s > 0 puts more t in the middle."""
    return 1.0 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1.0 + u)


def loss_weights(kind: str, t: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weights at noise levels t (sigma = t), SD3's weighting schemes as diffusers'
    compute_loss_weighting_for_sd3: none: 1; sigma_sqrt: t^-2 (t clamped at SIGMA_SQRT_MIN_T);
    cosmap: 2 / (pi (1 - 2t + 2t^2))."""
    if kind == "none":
        return torch.ones_like(t)
    if kind == "sigma_sqrt":
        return t.clamp(min=SIGMA_SQRT_MIN_T) ** -2.0
    if kind == "cosmap":
        return 2.0 / (math.pi * (1.0 - 2.0 * t + 2.0 * t ** 2))
    raise ValueError(f"unknown loss weighting {kind!r}; choose one of {', '.join(LOSS_WEIGHTINGS)}")


def sampling_sigmas(steps: int, image_seq_len: int | None = None, shift: bool = True) -> torch.Tensor:
    """FLUX's inference schedule: `steps + 1` noise levels from 1 down to 0 (float32).

    linspace(1, 0, steps + 1), shifted with mu from the image-token count when the
    model was trained that way (FLUX.1-dev style); unshifted for schnell-style models.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    if shift:
        if image_seq_len is None:
            raise ValueError("a shifted schedule needs the number of image tokens")
        t = time_shift(t, shift_mu(image_seq_len))
    return t.to(torch.float32)


def validation_timesteps(n: int = 8) -> torch.Tensor:
    """The validation loss's fixed timesteps: the midpoints t = (i + 0.5)/n, i = 0..n-1 (float32).

    Stratified as in the SD3 paper and as torchtitan's FLUX validation (`_VALIDATION_TIMESTEPS` in
    torchtitan/models/flux/flux_datasets.py). Midpoints, not i/n: at t = 0 the model sees the clean
    latent and must guess the noise, a term near 1 whatever the model, which would dominate the mean."""
    return (torch.arange(n, dtype=torch.float32) + 0.5) / n
