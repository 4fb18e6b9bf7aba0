"""Text conditioning as the transformer takes it, whatever the family: token states [B, L, D], a pooled
vector [B, Dp] where the family has one (FLUX.1's CLIP), and a mask [B, L] of the real tokens where
some positions are padding (trimmed text). The one pad-and-mask of the trainer's batches, the
sampler's and the sample-prompts file."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

# Trimmed text batches are padded to a multiple of this where a compiled model reads them (encode
# --compile, the trainer), so that it meets a few text lengths instead of a new one nearly every batch.
# 16, not 32: at CC12M-like 20-40-token captions most training batches end at 48 text tokens, not 64
# (5% fewer tokens per image), at the price of compiling twice as many lengths once.
TEXT_PAD_MULTIPLE = 16


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is at least `n`."""
    return -(-n // multiple) * multiple


@dataclass
class PromptEncoding:
    """One prompt's conditioning: states [L, D] (only the real tokens when trimmed), pooled [Dp] or None."""
    states: torch.Tensor
    pooled: torch.Tensor | None = None


@dataclass
class TextBatch:
    """A batch's conditioning; `mask` [B, L] marks real tokens (None: every position counts)."""
    states: torch.Tensor
    pooled: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    @staticmethod
    def collate(items: list[PromptEncoding], pad_multiple: int | None = None) -> "TextBatch":
        """Stack prompts, padding states with zeros to the longest (rounded up to `pad_multiple`, for a
        compiled transformer) and masking the padding; no mask where every position is real."""
        states, mask = pad_and_mask([e.states for e in items], pad_multiple)
        pooled = torch.stack([e.pooled for e in items]) if items[0].pooled is not None else None
        return TextBatch(states, pooled, None if bool(mask.all()) else mask)


def pad_and_mask(states: list[torch.Tensor], multiple: int | None = None,
                 alloc: Callable[[tuple], torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-prompt states [L_i, D] -> ([B, L, D] states, [B, L] bool mask), zero-padded to the longest
    (rounded up to `multiple`), the mask True at real tokens. `alloc(shape)` gives the [B, L, D] tensor
    to fill (its contents may be uninitialized); by default zeros beside the states."""
    longest = max(s.shape[0] for s in states)
    if multiple:
        longest = round_up(longest, multiple)
    shape = (len(states), longest, states[0].shape[1])
    out = alloc(shape) if alloc is not None else states[0].new_zeros(shape)
    mask = torch.zeros(len(states), longest, dtype=torch.bool, device=out.device)
    for i, s in enumerate(states):
        n = s.shape[0]
        out[i, :n] = s
        out[i, n:] = 0
        mask[i, :n] = True
    return out, mask


def pad_text(states: torch.Tensor, mask: torch.Tensor | None, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """States [..., L, D] and their mask [..., L] (None: every token real) extended with zero states,
    masked out, to `length` positions; the mask is returned even where none came in."""
    if mask is None:
        mask = torch.ones(states.shape[:-1], dtype=torch.bool, device=states.device)
    extra = length - states.shape[-2]
    if extra < 0:
        raise ValueError(f"cannot pad {states.shape[-2]} text positions to {length}")
    if extra == 0:
        return states, mask
    return torch.nn.functional.pad(states, (0, 0, 0, extra)), torch.nn.functional.pad(mask, (0, extra))


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """Host -> device without waiting for the device: a blocking copy from pageable memory
    synchronizes the stream (waiting for every queued kernel); a pinned one does not."""
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
