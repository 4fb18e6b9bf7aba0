import math

import numpy as np
import pytest
import torch

from shared.schedules import (sample_timesteps, sampling_sigmas, shift_mu, time_shift, validation_timesteps)


def test_mu_is_linear_between_the_flux_anchors():
    assert shift_mu(256) == pytest.approx(0.5)
    assert shift_mu(4096) == pytest.approx(1.15)
    assert shift_mu(2176) == pytest.approx((0.5 + 1.15) / 2)


def test_mu_matches_diffusers_calculate_shift():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    for n in (16, 256, 1024, 4096, 8192):
        assert shift_mu(n) == pytest.approx(calculate_shift(n))


def test_time_shift_formula_and_ends():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    out = time_shift(t, 1.0)
    assert out[0] == 0 and out[-1] == 1
    assert out[1].item() == pytest.approx(math.e / (math.e + 3.0))
    assert torch.all(out[1:3] > t[1:3])  # shifting pushes towards noise


def test_sampling_sigmas_match_diffusers_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    steps, seq = 10, 1024
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=shift_mu(seq))
    ours = sampling_sigmas(steps, seq)
    assert ours.shape == (steps + 1,)
    assert torch.allclose(ours, sched.sigmas.float(), atol=1e-6)
    flat = sampling_sigmas(4, shift=False)
    assert torch.allclose(flat, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))


def test_samplers_range_and_distribution():
    g = torch.Generator().manual_seed(0)
    u = sample_timesteps("uniform", 20000, generator=g)
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01
    ln = sample_timesteps("logit_normal", 20000, generator=g, mean=0.0, std=1.0)
    assert abs(torch.logit(ln).std().item() - 1.0) < 0.03
    ln_shifted = sample_timesteps("logit_normal", 20000, generator=g, mean=1.0, std=1.0)
    assert ln_shifted.mean() > ln.mean() + 0.1
    fs = sample_timesteps("flux_shift", 20000, generator=g, image_seq_len=4096)
    assert fs.mean() > 0.6  # shifted towards noise for large images
    with pytest.raises(ValueError, match="unknown timestep sampler"):
        sample_timesteps("cosine", 2)
    with pytest.raises(ValueError, match="image tokens"):
        sample_timesteps("flux_shift", 2)


def test_samplers_are_seeded():
    a = sample_timesteps("uniform", 5, generator=torch.Generator().manual_seed(3))
    b = sample_timesteps("uniform", 5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_validation_timesteps():
    # torchtitan/models/flux/flux_datasets.py: _VALIDATION_TIMESTEPS = tuple((index + 0.5) / 8 for index in
    # range(8)), the stratified midpoints of the SD3 paper (arXiv:2403.03206), written out: 1/16, 3/16, ..., 15/16.
    assert validation_timesteps().tolist() == [0.0625, 0.1875, 0.3125, 0.4375, 0.5625, 0.6875, 0.8125, 0.9375]
    assert validation_timesteps(4).tolist() == [0.125, 0.375, 0.625, 0.875]
    assert validation_timesteps().dtype == torch.float32
