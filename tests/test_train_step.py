"""The flow-matching step against a hand-written reference; masking; dropout; validation reruns."""
import dataclasses

import pytest
import torch

from shared.family.flux1 import FLUX1
from shared.latents import VAE_SCALE, VAE_SHIFT, pack_latents
from shared.presets import transformer_config
from shared.text_batch import TextBatch
from train.batch import TrainBatch
from train.model import use_flex_attention
from train.step import (EmptyPrompt, ValidationNoise, draw, drop_text, flow_matching_loss, summarize_validation,
                        training_loss, validation_sums)
from train.step import StepSettings as _StepSettings


def StepSettings(vae=None, **kw):
    """The step settings of a FLUX.1 cache made by the FLUX VAE (or `vae`: its shift and scale)."""
    vae = vae or {"shift_factor": VAE_SHIFT, "scaling_factor": VAE_SCALE}
    return _StepSettings(family=FLUX1, vae=vae, **kw)


@pytest.fixture(scope="module")
def model():
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(0)
    return FluxTransformer2DModel(**transformer_config("tiny")).eval()


def make_batch(b=3, h=8, w=6, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TrainBatch(key=[f"k{i}" for i in range(b)], latent=torch.randn(b, 16, h, w, generator=g),
                      text=torch.randn(b, length, 64, generator=g), pooled=torch.randn(b, 64, generator=g),
                      text_len=torch.full((b,), length, dtype=torch.int64))


def _parts(text: TextBatch):
    return text.states, text.pooled, text.mask


def test_one_step_loss_equals_hand_written_formula(model):
    batch = make_batch()
    settings = StepSettings(sampler="uniform", vae={"shift_factor": 0.1, "scaling_factor": 0.5})
    loss = training_loss(model, batch, settings, torch.Generator().manual_seed(7), None)

    # The same draws, in the documented order, then the formula written out by hand.
    g = torch.Generator().manual_seed(7)
    t = torch.rand(3, generator=g)
    noise = torch.randn(batch.latent.shape, generator=g)
    x0 = (batch.latent - 0.1) * 0.5
    x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
    h, w = 8, 6
    img_ids = torch.zeros(h // 2, w // 2, 3)
    img_ids[..., 1] = torch.arange(h // 2)[:, None]
    img_ids[..., 2] = torch.arange(w // 2)[None, :]
    pred = model(hidden_states=pack_latents(x_t), encoder_hidden_states=batch.text,
                 pooled_projections=batch.pooled, timestep=t, img_ids=img_ids.reshape(-1, 3),
                 txt_ids=torch.zeros(7, 3), return_dict=False)[0]
    reference = ((pred - pack_latents(noise - x0)) ** 2).mean()
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-7)


def test_padding_content_does_not_change_the_loss(model):
    batch = make_batch(length=9)
    batch.text_mask = torch.tensor([[True] * 4 + [False] * 5, [True] * 9, [True] * 6 + [False] * 3])
    other = dataclasses.replace(batch, text=batch.text.clone())
    other.text[~batch.text_mask] = 100.0 * torch.randn(int((~batch.text_mask).sum()), 64)
    settings = StepSettings()
    a = training_loss(model, batch, settings, torch.Generator().manual_seed(1), None)
    b = training_loss(model, other, settings, torch.Generator().manual_seed(1), None)
    assert abs((a - b).item()) < 1e-6
    # ...while without the mask the padding does matter (the test can fail).
    c = training_loss(model, dataclasses.replace(other, text_mask=None), settings,
                      torch.Generator().manual_seed(1), None)
    assert abs((a - c).item()) > 1e-4


def test_flex_block_mask_masks_what_the_sdpa_mask_masks(model):
    """run.masked_attention flex: the same loss as the boolean SDPA mask (forward: flex attention has
    no CPU backward), and padding content still has no effect."""
    import copy
    sdpa, flex = model, copy.deepcopy(model)
    use_flex_attention(flex)
    batch = make_batch(length=9)
    batch.text_mask = torch.tensor([[True] * 4 + [False] * 5, [True] * 9, [True] * 6 + [False] * 3])
    other = dataclasses.replace(batch, text=batch.text.clone())
    other.text[~batch.text_mask] = 100.0 * torch.randn(int((~batch.text_mask).sum()), 64)
    with torch.no_grad():
        ref = training_loss(sdpa, batch, StepSettings(), torch.Generator().manual_seed(1), None)
        got = training_loss(flex, batch, StepSettings(flex_mask=True), torch.Generator().manual_seed(1), None)
        padded = training_loss(flex, other, StepSettings(flex_mask=True), torch.Generator().manual_seed(1), None)
        unmasked = training_loss(flex, dataclasses.replace(other, text_mask=None), StepSettings(),
                                 torch.Generator().manual_seed(1), None)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert abs((padded - got).item()) < 1e-5 and abs((unmasked - got).item()) > 1e-4


def test_guidance_dropout_uses_empty_prompt():
    batch = make_batch(b=4, length=5)
    batch.text_mask = torch.ones(4, 5, dtype=torch.bool)
    empty = EmptyPrompt({"t5": torch.full((2, 64), 3.0), "clip": torch.full((64,), 2.0),
                         "t5_len": torch.tensor(2)}, FLUX1.text, "cpu")
    drop = torch.tensor([True, False, True, False])
    t5, clip, mask = _parts(drop_text(batch, empty, drop))
    assert torch.equal(t5[0, :2], torch.full((2, 64), 3.0)) and t5[0, 2:].abs().sum() == 0
    assert mask[0].tolist() == [True, True, False, False, False] and mask[1].all()
    assert torch.equal(clip[2], torch.full((64,), 2.0)) and torch.equal(t5[1], batch.text[1])
    coins = draw(make_batch(b=4000, h=2, w=2), StepSettings(guidance_dropout=0.1), torch.Generator().manual_seed(0))
    assert 0.07 < coins["drop_text"].float().mean() < 0.13 and coins["drop_pooled"] is coins["drop_text"]   # joint


def test_padded_text_dropout_gives_every_position_of_the_empty_prompt():
    batch = make_batch(b=3, length=4)                  # padded: no mask, every caption has all 4 positions
    empty = EmptyPrompt({"t5": torch.full((4, 64), 3.0), "clip": torch.full((64,), 2.0),
                         "t5_len": torch.tensor(1)}, FLUX1.text, "cpu")
    t5, clip, mask = _parts(drop_text(batch, empty, torch.tensor([False, True, False])))
    assert mask is None
    assert torch.equal(t5[1], torch.full((4, 64), 3.0)) and torch.equal(clip[1], torch.full((64,), 2.0))
    assert torch.equal(t5[[0, 2]], batch.text[[0, 2]]) and torch.equal(clip[[0, 2]], batch.pooled[[0, 2]])
    with pytest.raises(ValueError, match="empty-prompt text has 4 positions, the batch 5"):
        drop_text(make_batch(b=3, length=5), empty, torch.tensor([False, True, False]))


def test_independent_dropout_drops_t5_and_clip_with_a_coin_each():
    batch = make_batch(b=2, length=5)
    batch.text_mask = torch.ones(2, 5, dtype=torch.bool)
    empty = EmptyPrompt({"t5": torch.full((2, 64), 3.0), "clip": torch.full((64,), 2.0),
                         "t5_len": torch.tensor(2)}, FLUX1.text, "cpu")
    t5, clip, mask = _parts(drop_text(batch, empty, torch.tensor([True, False]), torch.tensor([False, True])))
    assert torch.equal(t5[0, :2], torch.full((2, 64), 3.0)) and torch.equal(clip[0], batch.pooled[0])
    assert mask[0].tolist() == [True, True, False, False, False]        # the mask follows the T5 coin
    assert torch.equal(t5[1], batch.text[1]) and mask[1].all() and torch.equal(clip[1], torch.full((64,), 2.0))
    # torchtitan's p = 0.447: each encoder dropped 44.7% of the time, both together p^2 = 20%.
    coins = draw(make_batch(b=20000, h=2, w=2), StepSettings(guidance_dropout=0.447, dropout_mode="independent"),
                 torch.Generator().manual_seed(0))
    t5_rate, clip_rate = coins["drop_text"].float().mean(), coins["drop_pooled"].float().mean()
    both = (coins["drop_text"] & coins["drop_pooled"]).float().mean()
    assert abs(t5_rate - 0.447) < 0.015 and abs(clip_rate - 0.447) < 0.015 and abs(both - 0.2) < 0.015


def test_draws_come_in_the_documented_order():
    """timesteps, noise, T5 coins, CLIP coins (independent), posterior noise (latent: sample): the
    order a resumed run replays from the restored generator, with the defaults' draws first."""
    batch = make_batch(b=3, h=4, w=4)
    batch.latent_logvar = -2.0 + torch.randn(batch.latent.shape, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(11)
    t, noise = torch.rand(3, generator=g), torch.randn(batch.latent.shape, generator=g)
    t5_coins, clip_coins = torch.rand(3, generator=g) < 0.5, torch.rand(3, generator=g) < 0.5
    posterior_noise = torch.randn(batch.latent.shape, generator=g)
    settings = StepSettings(guidance_dropout=0.5, dropout_mode="independent", latent="sample")
    r = draw(batch, settings, torch.Generator().manual_seed(11))
    assert torch.equal(r["t"], t) and torch.equal(r["noise"], noise)
    assert torch.equal(r["drop_text"], t5_coins) and torch.equal(r["drop_pooled"], clip_coins)
    torch.testing.assert_close(r["latent"], batch.latent + torch.exp(batch.latent_logvar / 2) * posterior_noise)
    joint = draw(batch, StepSettings(guidance_dropout=0.5), torch.Generator().manual_seed(11))
    assert torch.equal(joint["drop_text"], t5_coins) and "latent" not in joint   # the same first draws


def test_posterior_sample_is_what_the_loss_trains_on(model):
    batch = make_batch(b=2, h=4, w=4)
    batch.latent_logvar = torch.full(batch.latent.shape, -1.0)
    sample, mean = StepSettings(latent="sample"), StepSettings()
    r = draw(batch, sample, torch.Generator().manual_seed(3))
    expected = flow_matching_loss(model, r["latent"], batch.text_batch(), r["t"], r["noise"], sample)
    loss = training_loss(model, batch, sample, torch.Generator().manual_seed(3), None)
    torch.testing.assert_close(loss, expected.mean(), rtol=1e-6, atol=1e-7)
    assert abs(loss - training_loss(model, batch, mean, torch.Generator().manual_seed(3), None)) > 1e-4


def test_validation_is_identical_on_rerun_and_in_any_batching(model):
    batches = [make_batch(b=3, seed=1), make_batch(b=2, seed=2)]
    for i, b in enumerate(batches):
        b.key = [f"s{i}-{j}" for j in range(len(b.key))]
    settings = StepSettings()
    first = validation_sums(model, batches, settings, "cpu")
    again = validation_sums(model, batches, settings, "cpu")
    assert torch.equal(first, again)
    singles = [dataclasses.replace(b, key=b.key[j:j + 1], **{k: v[j:j + 1] for k, v in b.tensors().items()})
               for b in batches for j in range(len(b.key))]
    torch.testing.assert_close(validation_sums(model, singles, settings, "cpu"), first, rtol=1e-5, atol=1e-6)
    summary = summarize_validation(first)
    assert len([k for k in summary if k.startswith("val/loss_t")]) == 8
    assert summary["val/loss"] == pytest.approx(sum(summary[f"val/loss_t{i}_8"] for i in range(8)) / 8)


def test_validation_noise_is_drawn_once_and_reused_with_the_same_values(model, monkeypatch):
    import train.step as step
    batches = [make_batch(b=3, seed=1), make_batch(b=2, h=6, w=4, seed=2)]
    for i, b in enumerate(batches):
        b.key = [f"s{i}-{j}" for j in range(len(b.key))]
    settings = StepSettings()
    reference = validation_sums(model, batches, settings, "cpu")   # no cache: drawn on every pass
    drawn = []
    real = step.validation_noise
    monkeypatch.setattr(step, "validation_noise", lambda *a: drawn.append(a[0]) or real(*a))

    cache = ValidationNoise(1 << 20)
    first = validation_sums(model, batches, settings, "cpu", noise=cache)
    assert len(drawn) == 2 * 8 and cache.draws == 16                  # each (batch, timestep) once
    assert cache.bytes == 8 * 4 * (3 * 16 * 8 * 6 + 2 * 16 * 6 * 4)  # 32 bytes per latent value
    again = validation_sums(model, batches, settings, "cpu", noise=cache)
    assert len(drawn) == 16 and cache.draws == 16                     # the second pass drew nothing
    assert torch.equal(first, reference) and torch.equal(again, reference)

    # Past the cap the rest is drawn again on each pass: the first batch fits, the second does not.
    capped = ValidationNoise(8 * 4 * 3 * 16 * 8 * 6)
    drawn.clear()
    assert torch.equal(validation_sums(model, batches, settings, "cpu", noise=capped), reference)
    assert torch.equal(validation_sums(model, batches, settings, "cpu", noise=capped), reference)
    assert capped.draws == 16 + 8 and [k[0] for k in drawn[16:]] == ["s1-0"] * 8


# torchtitan/models/flux/flux_datasets.py: _VALIDATION_TIMESTEPS = tuple((index + 0.5) / 8 for index in range(8))
REFERENCE_TIMESTEPS = [0.0625, 0.1875, 0.3125, 0.4375, 0.5625, 0.6875, 0.8125, 0.9375]


def test_validation_loss_is_squared_error_over_latent_elements_at_the_reference_timesteps(model):
    """As torchtitan's FluxValidator: summed squared error (mse reduction="sum") over the summed
    latent element count, so a sample weighs by its latent size, at the stratified timesteps."""
    from shared.latents import scale_latents
    from train.step import validation_noise
    big, small = make_batch(b=2, h=8, w=8, seed=1), make_batch(b=3, h=4, w=4, seed=2)
    for i, b in enumerate((big, small)):
        b.key = [f"v{i}-{j}" for j in range(len(b.key))]
    got = summarize_validation(validation_sums(model, [big, small], StepSettings(), "cpu"))

    sse = torch.zeros(8, dtype=torch.float64)
    per_sample_means = []
    with torch.no_grad():
        for b in (big, small):
            for i, t in enumerate(REFERENCE_TIMESTEPS):
                noise = validation_noise(b.key, tuple(b.latent.shape[1:]), i)
                x0 = scale_latents(b.latent)
                h, w = b.latent.shape[-2:]
                pred = FLUX1.predict(model, pack_latents((1 - t) * x0 + t * noise), torch.full((len(b.key),), t),
                                     TextBatch(b.text, b.pooled), h, w)
                err = (pred - pack_latents(noise - x0)).double().pow(2)
                sse[i] += err.sum()
                per_sample_means += err.mean(dim=(1, 2)).tolist()
    elements = big.latent.numel() + small.latent.numel()   # at each timestep
    for i in range(8):
        assert got[f"val/loss_t{i}_8"] == pytest.approx(float(sse[i] / elements), rel=1e-5)
    assert got["val/loss"] == pytest.approx(float(sse.sum() / (8 * elements)), rel=1e-5)
    # One weight per sample would give another number: the test tells the two apart.
    assert abs(sum(per_sample_means) / len(per_sample_means) - got["val/loss"]) > 1e-3 * got["val/loss"]
