"""The flow-matching step (docs/DESIGN.md, "Training") and the validation loss.

x0 = the family's normalisation of z, the VAE posterior's mean (flow.latent: mean) or a sample of it
(sample: mean + exp(logvar / 2) * n); x_t = (1 - t) x0 + t n, v = n - x0, loss = mse(model(x_t, t, text), v).
Every formula comes from `shared`: the family's (normalisation, tokens, position ids, the transformer call:
shared/family/) and the timestep samplers' (shared/schedules.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from shared.family import Family
from shared.latents import sample_posterior
from shared.schedules import loss_weights, sample_timesteps, validation_timesteps
from shared.text_batch import TextBatch, pad_text

from .batch import TrainBatch
from .data import sample_seed
from .references import draw_keep, reference_tokens


@dataclass
class StepSettings:
    family: Family
    vae: dict                            # the cache's VAE facts (the family's normalisation)
    sampler: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    sigmoid_scale: float = 1.0
    shift: float = 3.0
    mode_scale: float = 1.29
    loss_weighting: str = "none"         # SD3's per-sample weight of t (shared/schedules.loss_weights)
    guidance_dropout: float = 0.0
    dropout_mode: str = "joint"          # joint: one coin drops text and pooled vector; independent: a coin each
    latent: str = "mean"                 # mean: the posterior mean; sample: a sample of the posterior
    guidance: float | None = None        # set for guidance-distilled models (guidance_embeds=True)
    flex_mask: bool = False              # text padding masked through flex attention (run.masked_attention)
    reference_dropout: float = 0.0       # p of dropping a sample's reference images (train/references.py)

    @classmethod
    def from_config(cls, flow, family: Family, vae: dict, **kw) -> "StepSettings":
        """From the config's flow section (FlowConfig), the cache's family and VAE facts."""
        return cls(family=family, vae=vae, sampler=flow.sampler, logit_mean=flow.logit_mean,
                   logit_std=flow.logit_std, sigmoid_scale=flow.sigmoid_scale, shift=flow.shift,
                   mode_scale=flow.mode_scale, loss_weighting=flow.loss_weighting, guidance_dropout=flow.guidance_dropout,
                   dropout_mode=flow.guidance_dropout_mode, latent=flow.latent,
                   reference_dropout=flow.reference_dropout, **kw)

    def x0_shape(self, latent_shape) -> tuple:
        """The shape of one sample's x0 (and noise) for a cached latent [C, h, w]."""
        return self.family.x0_shape(*latent_shape)


class EmptyPrompt:
    """The cache's empty-prompt encodings on the training device, for guidance dropout."""

    def __init__(self, encodings: dict, spec, device):
        self.states = encodings[spec.states].to(device)                                   # [L_e, D]
        self.pooled = encodings[spec.pooled].to(device) if spec.pooled else None          # [Dp]
        self.length = int(encodings[spec.length])


def drop_text(batch: TrainBatch, empty: EmptyPrompt, drop: torch.Tensor,
              drop_pooled: torch.Tensor | None = None) -> TextBatch:
    """The batch's text, where `drop` is True the empty prompt's instead, and its pooled vector where
    `drop_pooled` is (None: where `drop` is, the joint dropout)."""
    drop_pooled = drop if drop_pooled is None else drop_pooled
    states, pooled, mask = batch.text, batch.pooled, batch.text_mask
    length = states.shape[1]
    if mask is None:  # padded: every caption, and the empty prompt, has all max_length positions
        if empty.states.shape[0] != length:
            raise ValueError(f"empty-prompt text has {empty.states.shape[0]} positions, the batch {length}")
        empty_states = empty.states
    else:
        length = max(length, empty.states.shape[0])   # keep every position of the empty prompt
        states, mask = pad_text(states, mask, length)
        empty_states, _ = pad_text(empty.states, None, length)
        empty_mask = torch.arange(length, device=mask.device) < empty.length
        mask = torch.where(drop[:, None], empty_mask[None], mask)
    states = torch.where(drop[:, None, None], empty_states.to(states.dtype)[None], states)
    if pooled is not None:
        pooled = torch.where(drop_pooled[:, None], empty.pooled.to(pooled.dtype)[None], pooled)
    return TextBatch(states, pooled, mask)


def flow_matching_loss(model, latent: torch.Tensor, text: TextBatch, t: torch.Tensor, noise: torch.Tensor,
                       settings: StepSettings, mask: torch.Tensor | None = None, refs=(),
                       ref_keep: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample loss [B] (float32) for given timesteps and noise (x0-shaped); `latent` is the VAE
    posterior's mean or a sample of it, before the family's normalisation; `mask` [B, h, w] the loss masks
    (masked_mean). `refs`: reference latents (raw, as `latent`), placed by the family; the loss covers the
    target's tokens only."""
    family = settings.family
    h, w = latent.shape[-2:]
    x0 = family.to_x0(latent, settings.vae)
    tb = t.view(-1, *([1] * (x0.ndim - 1)))
    x_t = (1.0 - tb) * x0 + tb * noise
    target = family.pack(noise - x0)
    text = TextBatch(text.states.float(), None if text.pooled is None else text.pooled.float(), text.mask)
    pred = family.predict(model, family.pack(x_t), t, text, h, w, settings.guidance, settings.flex_mask,
                          refs=reference_tokens(family, refs, settings.vae), ref_keep=ref_keep)
    error = (pred.float() - target).pow(2)
    if mask is None:
        return error.mean(dim=(1, 2))
    return masked_mean(error, family.mask_tokens(mask.to(error.device, torch.float32), latent.shape[1]))


def masked_mean(error: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-sample mean of `error` [B, N, D] weighted by `weights` (the mask, laid out as the tokens), over the
    mean weight: an all-ones mask gives error.mean exactly (the same products, sums and a division by 1.0);
    an all-zero one gives 0."""
    return (weights * error).mean(dim=(1, 2)) / weights.mean(dim=(1, 2)).clamp(min=1e-12)


def draw(batch: TrainBatch, settings: StepSettings, generator: torch.Generator) -> dict:
    """The step's random draws from the step's generator, in this fixed order (a resumed run, whose
    generator state is restored, repeats them exactly): timesteps [B]; noise [B, *x0 shape]; the text
    dropout coins [B] (in joint mode the one coin for the text and the pooled vector); the pooled
    vector's coins [B] (independent mode only); the posterior's noise [B, C, h, w] (latent: sample only);
    the reference coins [B] (flow.reference_dropout > 0 on a batch with references only). The options add
    draws at the end only, so joint mode with the posterior mean draws what the trainer always drew."""
    latent = batch.latent
    b, _, h, w = latent.shape
    t = sample_timesteps(settings.sampler, b, generator=generator, image_seq_len=settings.family.image_tokens(h, w),
                         mean=settings.logit_mean, std=settings.logit_std, scale=settings.sigmoid_scale,
                         shift=settings.shift, mode_scale=settings.mode_scale, device=latent.device)
    noise = torch.randn((b, *settings.x0_shape(latent.shape[1:])), generator=generator, device=latent.device,
                        dtype=torch.float32)
    drop_text_ = torch.rand(b, generator=generator, device=latent.device) < settings.guidance_dropout
    drop_pooled = drop_text_
    if settings.dropout_mode == "independent":
        drop_pooled = torch.rand(b, generator=generator, device=latent.device) < settings.guidance_dropout
    out = {"t": t, "noise": noise, "drop_text": drop_text_, "drop_pooled": drop_pooled}
    if settings.latent == "sample":
        out["latent"] = sample_posterior(latent, batch.latent_logvar, generator)
    if batch.refs and settings.reference_dropout > 0:
        out["ref_keep"] = draw_keep(b, settings.reference_dropout, generator, latent.device)
    return out


def training_loss(model, batch: TrainBatch, settings: StepSettings, generator: torch.Generator,
                  empty: EmptyPrompt | None) -> torch.Tensor:
    """Mean flow-matching loss of one batch (on the model's device), with guidance dropout."""
    r = draw(batch, settings, generator)
    if empty is not None and settings.guidance_dropout > 0:
        text = drop_text(batch, empty, r["drop_text"], r["drop_pooled"])
    else:
        text = batch.text_batch()
    latent = r.get("latent", batch.latent)
    loss = flow_matching_loss(model, latent, text, r["t"], r["noise"], settings, mask=batch.mask, refs=batch.refs,
                              ref_keep=r.get("ref_keep"))
    if settings.loss_weighting != "none":   # none leaves the loss's arithmetic as it always was
        loss = loss * loss_weights(settings.loss_weighting, r["t"]).to(loss.device)
    return loss.mean()


def validation_noise(keys: list[str], shape: tuple, i: int) -> torch.Tensor:
    """[B, *shape] float32 on the CPU: each sample's fixed noise at validation timestep i, drawn from a
    seed fixed by the sample's key and i, so the same on every rerun and at any world size."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(sample_seed(k, i)))
                        for k in keys])


class ValidationNoise:
    """The fixed validation noise, drawn once per (batch, timestep) and reused by later passes.

    Memory: a batch's noise at all n timesteps is n x its latents' element count in float32, i.e.
    8 x 4 = 32 bytes per latent value: 16x the batch's latents cached in bf16 (2 MiB per 512-px sample,
    whose latent is 16 x 64 x 64). It is kept on the host, not the device, whose memory training needs;
    the copy to the device each pass is what the old per-pass draw did anyway. Entries are kept in
    first-seen order until `max_bytes` is reached; the rest are drawn again on each pass (the same
    values, at the old CPU cost). Cached tensors are only read (the loss builds new tensors from them).
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max(0, int(max_bytes))
        self.bytes = 0
        self.draws = 0          # (batch, timestep) noises drawn: once each if all fit under max_bytes
        self._cache: dict = {}

    def get(self, keys: list[str], shape: tuple, i: int) -> torch.Tensor:
        # Keyed by exactly what validation_noise depends on, so a hit is the very same tensor.
        entry = (tuple(keys), tuple(shape), i)
        noise = self._cache.get(entry)
        if noise is None:
            noise = validation_noise(keys, shape, i)
            self.draws += 1
            size = noise.numel() * noise.element_size()
            if self.bytes + size <= self.max_bytes:
                self._cache[entry] = noise
                self.bytes += size
        return noise


@torch.no_grad()
def validation_sums(model, batches, settings: StepSettings, device, n_timesteps: int = 8,
                    noise: ValidationNoise | None = None) -> torch.Tensor:
    """[2, n_timesteps] float64: at each fixed t = (i + 0.5)/n, the summed squared error over every
    latent element of the batches, and the number of those elements (for summarize_validation).
    It is measured on the posterior mean whatever flow.latent says: a fixed target, like the noise.

    Noise is drawn on the CPU from a seed fixed by each sample's key and timestep index, so the
    value is the same on every rerun and at any world size (sum over ranks, then divide). With
    `noise` (a ValidationNoise kept across passes) it is drawn once and reused, with the same values."""
    sums = torch.zeros(2, n_timesteps, dtype=torch.float64, device=device)
    ts = validation_timesteps(n_timesteps)
    for batch in batches:
        batch = batch.to(device)
        keys = batch.key
        b = len(keys)
        shape = tuple(settings.x0_shape(batch.latent.shape[1:]))
        elements = math.prod(shape)     # per sample: the loss is a mean over these (packing keeps them)
        for i, t_value in enumerate(ts.tolist()):
            n = noise.get(keys, shape, i) if noise is not None else validation_noise(keys, shape, i)
            t = torch.full((b,), t_value, device=device)
            loss = flow_matching_loss(model, batch.latent, batch.text_batch(), t, n.to(device), settings,
                                      refs=batch.refs)
            sums[0, i] += loss.double().sum() * elements
            sums[1, i] += b * elements
    return sums


def summarize_validation(sums: torch.Tensor) -> dict:
    """The validation loss as torchtitan's FLUX validation computes it: summed squared error over
    the summed count of latent elements, so a sample weighs by its latent size (a 64x64 latent four
    times a 32x32 one), not one per sample; also per timestep. Every sample is seen at every
    timestep, so the overall value is also the mean of the per-timestep values."""
    per_t = (sums[0] / sums[1].clamp(min=1)).tolist()
    n = len(per_t)
    out = {f"val/loss_t{i}_{n}": v for i, v in enumerate(per_t)}
    out["val/loss"] = float(sums[0].sum() / sums[1].sum().clamp(min=1))
    return out
