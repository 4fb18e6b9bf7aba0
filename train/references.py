"""Reference images in training (edit LoRAs: FLUX.1 Kontext, FLUX.2 with references): what the stream reads
of a cache with references, how a batch carries them, how the step places them, and what refuses them.

The cache holds each reference's raw VAE posterior mean (shared/cache/references.py); the step normalises it
with the family's to_x0 as it does the target, packs it, and hands (tokens, h, w) to the family's predict,
which places it and slices the prediction back to the noisy tokens: the loss covers the target only.
`flow.reference_dropout` drops all of a sample's references in a step (a coin from the step's generator,
drawn after every other draw, so resume stays exact and a run without it draws what it always drew)."""
from __future__ import annotations

import torch

from shared.cache.references import reference_count


def size_columns(count: int) -> list[str]:
    """The small columns that fix a sample's bucket: its latent size and each reference's."""
    return ["latent_h", "latent_w"] + [c for i in range(count) for c in (f"ref{i}_h", f"ref{i}_w")]


def bucket_size(columns: dict, i: int, count: int) -> tuple[int, ...]:
    """Row i's bucket: (h, w) of the target, then (h, w) of each reference: samples of one batch share all."""
    return tuple(int(columns[c][i]) for c in size_columns(count))


def pick_references(rg: dict, i: int, count: int) -> tuple[torch.Tensor, ...]:
    """Row i's reference latents [C, h, w], cloned out of the row group (as _sample clones its tensors)."""
    return tuple(rg[f"ref{r}_latent"][i].clone() for r in range(count))


def reference_tokens(family, refs, vae: dict) -> list[tuple[torch.Tensor, int, int]]:
    """Raw reference latents [B, C, h, w] -> the predict's refs: (packed x0 tokens, h, w) each."""
    return [(family.pack(family.to_x0(r, vae)), int(r.shape[-2]), int(r.shape[-1])) for r in refs]


def draw_keep(batch_size: int, dropout: float, generator: torch.Generator, device) -> torch.Tensor:
    """[B] bool: the samples that keep their references this step."""
    return torch.rand(batch_size, generator=generator, device=device) >= dropout


def check_reference_cache(reader, family, cfg) -> int:
    """The cache's reference count, refused before anything is built where the family cannot place that
    many or an option cannot take references (naming the key)."""
    count = reference_count(reader.manifest)
    if not count:
        if cfg.flow.reference_dropout > 0:
            raise ValueError(f"flow.reference_dropout {cfg.flow.reference_dropout}: the cache {reader.dir} holds "
                             "no reference images")
        return 0
    family.check_references(count, f"the cache {reader.dir}")
    if cfg.run.sample_every:
        raise ValueError(f"run.sample_every: the cache {reader.dir} holds reference images, and samples during "
                         "training cannot show them yet (its sample prompts carry no references); set "
                         "run.sample_every 0 and sample with flux-sample --image after training")
    return count
