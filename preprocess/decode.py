"""Decoding in DataLoader worker processes: input shards in, ready batches out.

Each worker takes every `num_workers`-th input shard of the rank's list and yields batches
that belong to one input shard each (so the main process can commit a shard once its last
batch is written). Batches hold images of one size (one bucket); the last item of a shard
carries `end=True` with nothing or the shard's remaining images.
"""
from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, replace

import torch
from torch.utils.data import IterableDataset, get_worker_info

from .captions import CaptionOptions, row_captions
from .images import ImageSkip, default_min_size, make_buckets, prepare_image
from .masks import sample_mask
from .sources import (SKIP_BAD_IMAGE, InputShard, Skip, add_example, image_bytes, iter_shard, read_captions,
                      skipped_name)


@dataclass(frozen=True)
class PrepOptions:
    resolution: int = 256
    buckets: bool = False
    min_size: int | None = None   # skip short sides under it; None: default_min_size(resolution); 0: keep all
    jpeg_draft: bool = True
    masks: bool = False           # read each image's loss mask (masks.py)
    references: int = 0                      # reference images per sample (references.py); 0: plain data
    reference_resolution: int | None = None  # their area cap in pixels (a side); None: the family's rule
    family: str | None = None                # whose reference sizes (shared/family/); None: FLUX.1

    def __post_init__(self):
        # Resolved here, so encode, its recorded settings and plan all see the same number.
        if self.min_size is None:
            object.__setattr__(self, "min_size", default_min_size(self.resolution))
        elif self.min_size < 0:
            raise ValueError(f"--min-size must be >= 0, not {self.min_size}")

    def bucket_list(self):
        return make_buckets(self.resolution) if self.buckets else None


def prepare_sample(sample, opts: PrepOptions, buckets):
    """RawSample -> (key, captions, Prepared) or Skip."""
    caption, why = read_captions(sample.files)
    data, why_img = image_bytes(sample.files)
    if why_img is not None:        # no image at all: a lone caption, or an empty image file
        return Skip(sample.key, why_img)
    if why is not None:
        return Skip(sample.key, why)
    try:
        prepared = prepare_image(data, opts.resolution, buckets=buckets, min_size=opts.min_size,
                                 jpeg_draft=opts.jpeg_draft)
    except ImageSkip as e:
        return Skip(sample.key, e.reason)
    except Exception:   # a decoder bug on hostile bytes must cost one sample, not the run
        return Skip(sample.key, SKIP_BAD_IMAGE)
    if opts.masks:
        try:
            crop = (prepared.pixels.shape[2], prepared.pixels.shape[1])
            prepared = replace(prepared, mask=sample_mask(sample.files, data, prepared.width, prepared.height, crop))
        except ImageSkip as e:
            return Skip(sample.key, e.reason)
    refs = prepare_references(sample.files, opts) if opts.references else []
    if isinstance(refs, str):
        return Skip(sample.key, refs)
    return sample.key, caption, prepared, refs


def prepare_references(files: dict, opts: PrepOptions):
    """The sample's prepared reference images, or a skip reason (references.py)."""
    from shared.family import get_family
    from .references import SKIP_BAD_REFERENCE, prepare_reference, reference_bytes
    data, why = reference_bytes(files, opts.references)
    if why is not None:
        return why
    try:
        return [prepare_reference(d, get_family(opts.family), opts.references, opts.reference_resolution)
                for d in data]
    except ImageSkip as e:
        return e.reason
    except Exception:   # as for the target: one sample, not the run
        return SKIP_BAD_REFERENCE


def _stack(prepared: list):
    return (torch.stack([p.pixels for p in prepared]),
            torch.tensor([[p.width, p.height] for p in prepared], dtype=torch.int32))


def _batch(shard: InputShard, items, skips, end, decode_s, examples=None):
    pixels, sizes = _stack([it[2] for it in items]) if items else (None, None)
    refs = [_stack([it[3][i] for it in items]) for i in range(len(items[0][3]))] if items else []
    # A row's first caption is encoded with the batch (as before there were several); the others apart.
    return {"shard": shard.id, "pixels": pixels, "sizes": sizes, "keys": [shard.row_key(it[0]) for it in items],
            "captions": [it[1][0] for it in items], "alt_captions": [it[1][1:] for it in items],
            "skips": dict(skips), "end": end, "decode_s": decode_s,
            "skip_examples": examples or {},   # the shard's named skips, on its last batch
            "refs": [{"pixels": p, "sizes": s} for p, s in refs],   # each reference's, as pixels and sizes
            **({"masks": torch.stack([it[2].mask for it in items])} if items and items[0][2].mask is not None
               else {})}


def shard_batches(shard: InputShard, opts: PrepOptions, batch_size: int, captions: CaptionOptions = CaptionOptions()):
    """Yield the batches of one input shard (see the module docstring); each row's captions as
    captions.row_captions makes them."""
    buckets = opts.bucket_list()
    pending: dict[tuple, list] = {}
    skips: dict[str, int] = {}
    examples: dict[str, list[str]] = {}
    decode_s = 0.0
    t0 = time.perf_counter()
    for sample in iter_shard(shard, opts.references):
        out = sample if isinstance(sample, Skip) else prepare_sample(sample, opts, buckets)
        if isinstance(out, Skip):
            skips[out.reason] = skips.get(out.reason, 0) + 1
            add_example(examples, out.reason, skipped_name(shard, out.key, getattr(sample, "files", ())))
            continue
        out = (out[0], row_captions(out[1], shard.row_key(out[0]), captions), *out[2:])
        # one batch, one size of each image: the target's and each reference's
        size = (tuple(out[2].pixels.shape[1:]), *(tuple(r.pixels.shape[1:]) for r in out[3]))
        group = pending.setdefault(size, [])
        group.append(out)
        if len(group) >= batch_size:
            decode_s += time.perf_counter() - t0
            yield _batch(shard, group, skips, False, decode_s)
            pending[size], skips, decode_s = [], {}, 0.0
            t0 = time.perf_counter()
    decode_s += time.perf_counter() - t0
    rest = [(size, group) for size, group in sorted(pending.items()) if group]
    if not rest:
        yield _batch(shard, [], skips, True, decode_s, examples)
        return
    for i, (_, group) in enumerate(rest):
        last = i == len(rest) - 1
        yield _batch(shard, group, skips if i == 0 else {}, last, decode_s if i == 0 else 0.0,
                     examples if last else None)


class ShardBatches(IterableDataset):
    """The rank's input shards, split across DataLoader workers (use batch_size=None)."""

    def __init__(self, shards: list[InputShard], opts: PrepOptions, batch_size: int,
                 captions: CaptionOptions = CaptionOptions()):
        self.shards, self.opts, self.batch_size, self.captions = list(shards), opts, batch_size, captions

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        for shard in self.shards[wid::nw]:
            yield from shard_batches(shard, self.opts, self.batch_size, self.captions)


def worker_init(_worker_id: int) -> None:
    # Decoding is PIL, one thread per worker; torch's intra-op pool would only oversubscribe.
    torch.set_num_threads(1)
    sys.excepthook = _quiet_lost_receiver(sys.excepthook)


def _quiet_lost_receiver(default):
    """A worker's excepthook that stays silent when a helper thread loses its connection to the main
    process: multiprocessing's resource sharer (which hands the batches' file descriptors over) reports
    that with a traceback when the main process stops receiving, as after Ctrl-C, whose own message
    says what was kept. Anything else is reported as before."""
    def hook(exc_type, exc, tb):
        if issubclass(exc_type, (OSError, EOFError)) and threading.current_thread() is not threading.main_thread():
            return
        default(exc_type, exc, tb)
    return hook
