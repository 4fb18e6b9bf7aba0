"""The timestep samplers and loss weightings (flow.sampler, flow.loss_weighting) against diffusers'
training_utils and scheduler, and the distribution of t that the trainer's own draw gives, per family."""
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from shared.family import FLUX1, FLUX2
from shared.schedules import fixed_shift, loss_weights, sample_timesteps, shift_mu, time_shift
from train.config import ConfigError, load_config
from train.batch import TrainBatch
from train.step import StepSettings, draw, flow_matching_loss, training_loss


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def test_samplers_draw_what_diffusers_draws_from_the_same_generator():
    """diffusers' compute_density_for_timestep_sampling takes a generator: the same seed gives the same t.
    kohya's sigmoid(scale * randn) is SD3's logit_normal with mean 0 and std scale."""
    n = 257
    mode = compute_density_for_timestep_sampling("mode", n, mode_scale=1.29, generator=seeded(1))
    assert torch.equal(sample_timesteps("mode", n, mode_scale=1.29, generator=seeded(1)), mode)
    neg = compute_density_for_timestep_sampling("mode", n, mode_scale=-0.5, generator=seeded(2))
    assert torch.equal(sample_timesteps("mode", n, mode_scale=-0.5, generator=seeded(2)), neg)
    ref = compute_density_for_timestep_sampling("logit_normal", n, logit_mean=0.0, logit_std=0.7, generator=seeded(3))
    assert torch.equal(sample_timesteps("sigmoid", n, scale=0.7, generator=seeded(3)), ref)
    ln = compute_density_for_timestep_sampling("logit_normal", n, logit_mean=0.5, logit_std=1.3, generator=seeded(4))
    torch.testing.assert_close(sample_timesteps("logit_normal", n, mean=0.5, std=1.3, generator=seeded(4)), ln)
    uniform = compute_density_for_timestep_sampling("none", n, generator=seeded(5))
    assert torch.equal(sample_timesteps("uniform", n, generator=seeded(5)), uniform)
    shifted = sample_timesteps("shift", n, scale=0.7, shift=3.0, generator=seeded(3))
    torch.testing.assert_close(shifted, 3.0 * ref / (1 + 2.0 * ref))


def test_fixed_shift_is_the_sd3_schedulers_shift():
    for shift in (0.5, 1.0, 3.0):
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        unshifted = torch.arange(1000, 0, -1, dtype=torch.float32) / 1000
        torch.testing.assert_close(fixed_shift(unshifted, shift), sched.sigmas.float())


def test_loss_weights_are_diffusers_sd3_weightings():
    t = torch.linspace(0.001, 1.0, 1000)
    for kind in ("none", "sigma_sqrt", "cosmap"):
        torch.testing.assert_close(loss_weights(kind, t), compute_loss_weighting_for_sd3(kind, sigmas=t).float())
    tiny = torch.tensor([0.0, 1e-5])   # a continuous draw can land nearer 0 than a 1000-step schedule
    torch.testing.assert_close(loss_weights("sigma_sqrt", tiny), torch.full((2,), 1e6))
    with pytest.raises(ValueError, match="unknown loss weighting"):
        loss_weights("snr", t)


def _normal_cdf(x):
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def _mode_cdf(t, s):
    """P(f_mode(u) <= t) = 1 - f^-1(t), f decreasing on [0, 1]: its inverse by bisection (float64)."""
    lo, hi = torch.zeros_like(t), torch.ones_like(t)
    for _ in range(60):
        mid = (lo + hi) / 2
        f = 1 - mid - s * (torch.cos(math.pi * mid / 2) ** 2 - 1 + mid)
        lo, hi = torch.where(f > t, mid, lo), torch.where(f > t, hi, mid)
    return 1 - (lo + hi) / 2


def _logit(t):
    return torch.log(t) - torch.log1p(-t)


# The intended CDF of each sampler, written from its definition (not from our code).
CDFS = {
    "uniform": lambda t, tokens: t,
    "logit_normal": lambda t, tokens: _normal_cdf((_logit(t) - 0.3) / 0.8),
    "sigmoid": lambda t, tokens: _normal_cdf(_logit(t) / 1.4),
    "shift": lambda t, tokens: _normal_cdf(_logit(t / (2.5 - 1.5 * t)) / 1.4),   # t = s u / (1 + (s-1) u)
    "mode": lambda t, tokens: _mode_cdf(t, 1.29),
    "flux_shift": lambda t, tokens: 1 / (1 + math.exp(shift_mu(tokens)) * (1 / t - 1)),
}
FLOW = {"logit_mean": 0.3, "logit_std": 0.8, "sigmoid_scale": 1.4, "shift": 2.5, "mode_scale": 1.29}


def _ks(samples, cdf) -> float:
    """Kolmogorov-Smirnov statistic sup |F_n - F| of samples against a CDF."""
    x = samples.double().sort().values.clamp(1e-12, 1 - 1e-12)
    f = cdf(x)
    n = len(x)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return max((i / n - f).max().item(), (f - (i - 1) / n).max().item())


def _trainer_draws(family, sampler, steps=80, b=64):
    """t as the trainer draws it: train.step.draw over `steps` steps of one seeded generator."""
    settings = StepSettings(family=family, vae={}, sampler=sampler, logit_mean=FLOW["logit_mean"],
                            logit_std=FLOW["logit_std"], sigmoid_scale=FLOW["sigmoid_scale"], shift=FLOW["shift"],
                            mode_scale=FLOW["mode_scale"])
    batch = TrainBatch(key=[""] * b, latent=torch.zeros(b, 1, 8, 8), text=torch.zeros(b, 1, 1), pooled=None,
                       text_len=torch.ones(b, dtype=torch.int64))
    g = seeded(0)
    return torch.cat([draw(batch, settings, g)["t"] for _ in range(steps)]), family.image_tokens(8, 8)


@pytest.mark.parametrize("family", [FLUX1, FLUX2], ids=["flux1", "flux2"])
def test_the_trainers_t_follows_each_samplers_distribution(family):
    """KS test at about the 0.1% level (critical value 1.95 / sqrt(n)); and the same test rejects the
    draws against another sampler's CDF, so it can fail."""
    for sampler, cdf in CDFS.items():
        t, tokens = _trainer_draws(family, sampler)
        critical = 1.95 / math.sqrt(len(t))
        assert _ks(t, lambda x: cdf(x, tokens)) < critical, sampler
        other = CDFS["uniform" if sampler != "uniform" else "mode"]
        assert _ks(t, lambda x: other(x, tokens)) > critical, f"{sampler} is indistinguishable from another"


def test_loss_weighting_multiplies_each_samples_loss_by_diffusers_weight():
    from diffusers import FluxTransformer2DModel

    from shared.presets import transformer_config
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**transformer_config("tiny")).eval()
    g = seeded(0)
    batch = TrainBatch(key=["a", "b", "c"], latent=torch.randn(3, 16, 4, 4, generator=g),
                       text=torch.randn(3, 5, 64, generator=g), pooled=torch.randn(3, 64, generator=g),
                       text_len=torch.full((3,), 5, dtype=torch.int64))
    vae = {"shift_factor": 0.1, "scaling_factor": 0.5}
    for kind in ("sigma_sqrt", "cosmap"):
        settings = StepSettings(family=FLUX1, vae=vae, sampler="logit_normal", loss_weighting=kind)
        with torch.no_grad():
            got = training_loss(model, batch, settings, seeded(9), None)
            r = draw(batch, settings, seeded(9))
            plain = flow_matching_loss(model, batch.latent, batch.text_batch(), r["t"], r["noise"], settings)
        weight = compute_loss_weighting_for_sd3(kind, sigmas=r["t"])
        torch.testing.assert_close(got, (plain * weight).mean())


def test_timestep_keys_are_checked_and_the_defaults_draw_as_before():
    base = {"data.train_cache": "x", "run.max_steps": 1}
    cfg = load_config(None, base)
    assert (cfg.flow.sampler, cfg.flow.loss_weighting) == ("uniform", "none")
    with pytest.raises(ConfigError, match="flow.shift"):
        load_config(None, {**base, "flow.shift": 0})
    with pytest.raises(ConfigError, match="flow.mode_scale"):
        load_config(None, {**base, "flow.mode_scale": 2.0})
    with pytest.raises(ConfigError, match="flow.loss_weighting"):
        load_config(None, {**base, "flow.loss_weighting": "snr"})
    # the flux_shift sampler is time_shift of a uniform draw, as it always was
    assert torch.equal(sample_timesteps("flux_shift", 9, generator=seeded(1), image_seq_len=256),
                       time_shift(torch.rand(9, generator=seeded(1)), shift_mu(256)))
