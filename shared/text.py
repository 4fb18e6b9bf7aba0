"""Prompt encoding with T5 and CLIP, the same code for the encoder stage and the sampler."""
from __future__ import annotations

from typing import Callable

import torch

from .cache.schema import T5_MODES

# Trimmed T5 batches are padded to a multiple of this where a compiled model reads them (encode
# --compile, the trainer), so that it meets a few text lengths instead of a new one nearly every batch.
# 16, not 32: at CC12M-like 20-40-token captions most training batches end at 48 text tokens, not 64
# (5% fewer tokens per image), at the price of compiling twice as many lengths once.
T5_PAD_MULTIPLE = 16
# CLIP's input is cut after the pooled token, at a multiple of this (see clip_pooled).
CLIP_CUT_MULTIPLE = 16


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is at least `n`."""
    return -(-n // multiple) * multiple


@torch.no_grad()
def encode_prompts(prompts: list[str], t5_tokenizer, t5, clip_tokenizer, clip, *, t5_mode: str = "padded",
                   t5_max_length: int = 512, device=None, pad_to_multiple_of: int | None = None) -> dict:
    """Encode prompts as FLUX does.

    Returns t5 [B, L, D] (L = t5_max_length when padded, the longest prompt when
    trimmed), t5_len [B] (real tokens, end-of-sequence included), t5_mask [B, L] bool,
    clip [B, D_clip] (pooled output).

    padded: T5 sees `t5_max_length` tokens with no attention mask (FLUX.1's convention).
    trimmed: T5 sees each prompt's real tokens only (attention mask), and only those are kept.
    `pad_to_multiple_of` (trimmed only) rounds the batch's text length up, so that a compiled T5
    meets few shapes; the masked padding leaves the real tokens' encodings unchanged.
    """
    if t5_mode not in T5_MODES:
        raise ValueError(f"unknown T5 mode {t5_mode!r}; choose one of {', '.join(T5_MODES)}")
    device = device if device is not None else t5.device
    padding = "max_length" if t5_mode == "padded" else "longest"
    t5_in = t5_tokenizer(prompts, padding=padding, max_length=t5_max_length, truncation=True,
                         return_tensors="pt")
    ids, mask = t5_in.input_ids, t5_in.attention_mask
    if t5_mode == "trimmed" and pad_to_multiple_of:
        ids, mask = _pad_to_bucket(ids, mask, pad_to_multiple_of, t5_max_length, t5_tokenizer.pad_token_id)
    ids, mask = _to_device(ids, device), _to_device(mask, device)
    if t5_mode == "padded":
        t5_out = t5(ids, output_hidden_states=False)[0]
    else:
        t5_out = t5(ids, attention_mask=mask, output_hidden_states=False)[0]
    clip_in = clip_tokenizer(prompts, padding="max_length", max_length=clip_tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
    pooled = clip_pooled(clip, clip_in.input_ids, clip_tokenizer.eos_token_id, device)
    return {"t5": t5_out, "t5_len": mask.sum(1), "t5_mask": mask.bool(), "clip": pooled}


def clip_pooled(clip, ids: torch.Tensor, eos_id: int | None, device, multiple: int = CLIP_CUT_MULTIPLE) -> torch.Tensor:
    """CLIP's pooled output for [B, 77] token ids, running only the positions up to the pooled one.

    CLIP's text transformer is causal: a position sees only those before it, so the pooled
    token's state (the end-of-text token's; older configs pool at the largest token id) does
    not depend on the padding after it. FLUX pads every prompt to 77 tokens, while captions
    are mostly 20-40: the cut skips about half of CLIP's work. The cut is at a multiple of
    `multiple` (so CLIP meets five lengths at most), past both candidate pooled positions."""
    last = ids.to(torch.int64).argmax(dim=1)             # pooled position in configs with eos_token_id 2
    if eos_id is not None:
        is_eos = ids == eos_id
        last = torch.maximum(last, torch.where(is_eos.any(1), is_eos.int().argmax(dim=1), ids.shape[1] - 1))
    keep = int(last.max()) + 1
    keep = min(ids.shape[1], round_up(keep, multiple))
    return clip(_to_device(ids[:, :keep].contiguous(), device), output_hidden_states=False).pooler_output


def _pad_to_bucket(ids: torch.Tensor, mask: torch.Tensor, multiple: int, max_length: int, pad_id: int):
    """Pad [B, L] ids and mask up to L rounded to `multiple`, never past `max_length` (which need
    not be a multiple itself: the tokenizer's own pad_to_multiple_of refuses that)."""
    length = ids.shape[1]
    target = max(length, min(round_up(length, multiple), max_length))
    extra = target - length
    if extra <= 0:
        return ids, mask
    return (torch.nn.functional.pad(ids, (0, extra), value=pad_id),
            torch.nn.functional.pad(mask, (0, extra), value=0))


def stack_text(states: list[torch.Tensor], multiple: int | None = None,
               alloc: Callable[[tuple], torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Trimmed T5 states, [L_i, D] per prompt -> ([B, L, D] states, [B, L] bool mask), zero-padded to
    the longest (rounded up to `multiple`), the mask True at real tokens. The one pad-and-mask of
    trimmed text for the trainer's batches and the sampler's. `alloc(shape)` gives the [B, L, D]
    tensor to fill (its contents may be uninitialized); by default zeros beside the states."""
    longest = max(s.shape[0] for s in states)
    if multiple:
        longest = round_up(longest, multiple)
    shape = (len(states), longest, states[0].shape[1])
    t5 = alloc(shape) if alloc is not None else states[0].new_zeros(shape)
    mask = torch.zeros(len(states), longest, dtype=torch.bool, device=t5.device)
    for i, s in enumerate(states):
        n = s.shape[0]
        t5[i, :n] = s
        t5[i, n:] = 0
        mask[i, :n] = True
    return t5, mask


def pad_text(t5: torch.Tensor, mask: torch.Tensor | None, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 states [..., L, D] and their mask [..., L] (None: every token real) extended with zero states,
    masked out, to `length` positions; the mask is returned even where none came in."""
    if mask is None:
        mask = torch.ones(t5.shape[:-1], dtype=torch.bool, device=t5.device)
    extra = length - t5.shape[-2]
    if extra < 0:
        raise ValueError(f"cannot pad {t5.shape[-2]} text positions to {length}")
    if extra == 0:
        return t5, mask
    return torch.nn.functional.pad(t5, (0, 0, 0, extra)), torch.nn.functional.pad(mask, (0, extra))


def _to_device(t: torch.Tensor, device) -> torch.Tensor:
    """Host -> device without waiting for the device: a blocking copy from pageable memory
    synchronizes the stream (waiting for every queued kernel); a pinned one does not."""
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
