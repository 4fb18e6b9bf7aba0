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

SAMPLERS = ("uniform", "logit_normal", "flux_shift")


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
                     device=None) -> torch.Tensor:
    """Draw `batch` training timesteps in [0, 1] (float32).

    uniform: the torchtitan/MLPerf reference. logit_normal: sigmoid(N(mean, std)), as SD3.
    flux_shift: uniform pushed through FLUX's resolution-dependent time shift.
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
    raise ValueError(f"unknown timestep sampler {kind!r}; choose one of {', '.join(SAMPLERS)}")


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
