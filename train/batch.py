"""A training batch (TrainBatch) and how samples of one latent size become one (collate), in a DataLoader
worker straight into shared memory; the stream that makes them is train/data.py."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch
from torch.utils.data import get_worker_info

from shared.text_batch import TEXT_PAD_MULTIPLE, TextBatch, pad_and_mask


@dataclass
class Sample:
    """One cached sample's tensors, cloned out of its row group: latent [C, h, w], text states [L, D]
    (only the real tokens when trimmed), the pooled vector [Dp] where the family has one; the posterior's
    log-variance where the stream reads it."""
    key: str
    latent: torch.Tensor
    text: torch.Tensor
    pooled: torch.Tensor | None
    text_len: int
    latent_logvar: torch.Tensor | None = None
    mask: torch.Tensor | None = None             # [h, w], where the stream reads masks (flow.masked_loss)
    alts: tuple = ()      # the row's other captions' (text, pooled, text_len), where the stream reads them
    refs: tuple = ()                             # reference latents [C, h_i, w_i] (train/references.py)


def _batch_tensor(like: torch.Tensor, shape: tuple) -> torch.Tensor:
    """An uninitialized contiguous tensor for a batch. In a DataLoader worker it is allocated in shared
    memory, the way the batch reaches the trainer: a private tensor would be copied there whole when
    the worker hands it over (torch's default_collate allocates likewise). Each call is a new buffer,
    written once here and never again by the worker."""
    if get_worker_info() is None:
        return like.new_empty(shape)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * like.element_size())
    return like.new_empty(0).set_(storage, 0, shape)


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(tensors, out=_batch_tensor(tensors[0], (len(tensors), *tensors[0].shape)))


@dataclass
class TrainBatch:
    """Samples of one latent size, as collate builds them (in a DataLoader worker: in shared memory).
    `text_mask` (True = real token) only for trimmed text; `pooled` where the family has one;
    `latent_logvar` only where the stream reads it; `pos` = (worker, epoch, index) on the training
    stream's batches, None on held-out ones."""
    key: list[str]
    latent: torch.Tensor                        # [B, C, h, w]
    text: torch.Tensor                          # [B, L, D]
    text_len: torch.Tensor                      # [B] int64: real tokens per caption
    pooled: torch.Tensor | None = None          # [B, Dp]
    text_mask: torch.Tensor | None = None       # [B, L] bool
    latent_logvar: torch.Tensor | None = None   # [B, C, h, w]
    pos: torch.Tensor | None = None             # [3] int64
    mask: torch.Tensor | None = None            # [B, h, w]: the loss masks, where the stream reads them
    refs: tuple = ()                            # reference latents, each [B, C, h_i, w_i]

    def text_batch(self) -> TextBatch:
        return TextBatch(self.text, self.pooled, self.text_mask)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensor fields that are set, by name."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {name: v for name, v in values.items() if isinstance(v, torch.Tensor)}

    def pin_memory(self) -> "TrainBatch":
        """A copy in pinned memory (the DataLoader's pin-memory thread calls this), for asynchronous copies."""
        return replace(self, **{name: t.pin_memory() for name, t in self.tensors().items()},
                       refs=tuple(r.pin_memory() for r in self.refs))

    def to(self, device) -> "TrainBatch":
        """On `device`, copied without a sync (asynchronous from pinned memory). `pos` stays on the host,
        which reads it (the stream position, the batch's generator)."""
        return replace(self, **{name: t.to(device, non_blocking=True) for name, t in self.tensors().items()
                                if name != "pos"}, refs=tuple(r.to(device, non_blocking=True) for r in self.refs))


def collate(items: list[Sample], text_mode: str) -> TrainBatch:
    """Samples of one latent size -> a batch. Trimmed text is zero-padded to the batch's longest
    caption, rounded up to TEXT_PAD_MULTIPLE, with a mask (True = real token); padded text has no
    mask (FLUX attends to all of it). `latent_logvar` comes along when the samples carry it."""
    key = [it.key for it in items]
    latent = _stack([it.latent for it in items])
    pooled = _stack([it.pooled for it in items]) if items[0].pooled is not None else None
    text_len = torch.tensor([it.text_len for it in items], dtype=torch.int64)
    latent_logvar = _stack([it.latent_logvar for it in items]) if items[0].latent_logvar is not None else None
    if text_mode == "padded":
        text, text_mask = _stack([it.text for it in items]), None
    else:
        first = items[0].text
        text, text_mask = pad_and_mask([it.text for it in items], TEXT_PAD_MULTIPLE,
                                       alloc=lambda shape: _batch_tensor(first, shape))
    mask = _stack([it.mask for it in items]) if items[0].mask is not None else None
    refs = tuple(_stack([it.refs[r] for it in items]) for r in range(len(items[0].refs)))
    return TrainBatch(key=key, latent=latent, text=text, pooled=pooled, text_len=text_len, text_mask=text_mask,
                      latent_logvar=latent_logvar, mask=mask, refs=refs)
