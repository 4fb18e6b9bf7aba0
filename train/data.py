"""Streaming the cache into batches: split across ranks and workers, shuffled per epoch, bucketed, resumable.

Each (rank, DataLoader worker) pair is a *slot*. An epoch shuffles the shard order by (seed, epoch),
lists every shard's row groups in that order and deals them round-robin to the slots. A slot reads its
row groups in turn through a shuffle buffer and groups samples of one latent size into batches.
Every batch is full: each size's last, partial batch closes the epoch topped up with its own samples
again (`fill_batch`), so no sample is dropped and none waits for another epoch. Workers loop over
epochs forever; the trainer decides when to stop.

Every batch carries `(worker, epoch, index)`; the trainer records the last one consumed per worker.
Resuming replays an epoch up to that index reading only the small `latent_h/latent_w` columns (the
shuffle decisions depend only on counts), then reads the tensors of the samples still pending, so a
resumed run sees exactly the batches an uninterrupted run would have seen next.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shared.cache import CacheError, CacheReader, check_text_mode
from shared.cache.alt_captions import alt_name
from shared.cache.references import reference_count

from .batch import Sample, TrainBatch, collate
from .config import DataConfig
from .references import bucket_size, pick_references, size_columns


def open_cache(cache_dir, expected_text_mode: str | None = None, where: str = "cache",
               latent_logvar: bool = False, storage_options: dict | None = None, mask: bool = False) -> CacheReader:
    """Open a cache (a folder or a URL; `storage_options` for its file system) and refuse one of
    another schema version (read_manifest) or text mode, or one without the posterior's log-variance
    when `latent_logvar` (flow.latent: sample) needs it."""
    reader = CacheReader(cache_dir, storage_options)
    check_text_mode(reader.manifest, expected_text_mode, where=f"{where} {cache_dir}")
    if latent_logvar and "latent_logvar" not in reader.manifest["dtypes"]:
        raise CacheError(f"{where} {cache_dir} has no latent_logvar column, which flow.latent: sample needs "
                         "(the posterior's log-variance): encode with --store-logvar, or use flow.latent: mean")
    if mask and "mask" not in reader.manifest["dtypes"]:
        raise CacheError(f"{where} {cache_dir} has no loss masks, which flow.masked_loss: true needs: encode with "
                         "--masks, or set flow.masked_loss false")
    return reader


def vae_facts(reader: CacheReader, where: str) -> dict:
    """What the cache records of the VAE that encoded its latents (FLUX.1: shift and scale), all the
    family's normalisation needs. No default: latents normalised with another VAE's factors would
    train silently on the wrong x0."""
    facts = reader.manifest.get("vae") or {}
    missing = [k for k in reader.family.vae_fact_keys if not isinstance(facts.get(k), (int, float, list))]
    if missing:
        raise CacheError(f"{where}: the manifest has no vae.{', vae.'.join(missing)} (how the latents are "
                         "normalised); a cache written by flux-prep encode records them")
    return facts


def encoding_facts(reader: CacheReader) -> dict:
    """What makes two caches' tensors comparable: the family, the encoders (by weight hash, else by
    source), the VAE's factors, the tensor dims, the text mode and length."""
    manifest, spec = reader.manifest, reader.family.text
    encoders = {part: (ident.get("sha256") or ident.get("source")) if isinstance(ident, dict) else ident
                for part, ident in (manifest.get("encoders") or {}).items()}
    text = spec.settings(manifest)
    return {"family": reader.family.name, "encoders": encoders, "vae": manifest.get("vae"),
            "dims": manifest.get("dims"), f"{spec.label} mode": text.get("mode"),
            f"{spec.label} max_length": text.get("max_length"), "references": reference_count(manifest)}


def open_validation_cache(cache_dir, train: CacheReader, storage_options: dict | None = None) -> CacheReader:
    """Open the held-out cache, refusing one encoded otherwise than the training cache: its loss
    would measure the difference between the encodings, not the model."""
    reader = open_cache(cache_dir, train.text_mode, "validation cache", storage_options=storage_options)
    vae_facts(reader, f"validation cache {cache_dir}")
    ours, theirs = encoding_facts(reader), encoding_facts(train)
    diffs = [f"{k}: {ours.get(k)!r} (training cache: {theirs.get(k)!r})" for k in dict.fromkeys([*ours, *theirs])
             if ours.get(k) != theirs.get(k)]
    if diffs:
        raise CacheError(f"validation cache {cache_dir} was encoded otherwise than the training cache "
                         f"{train.dir}: " + "; ".join(diffs))
    return reader


@dataclass
class StreamItem:
    """A sample's place in a slot's epoch: its row group (`unit`: shard index, row group index), its
    row there and its latent size (the batch it joins). `sample` is None while a resumed epoch is
    replayed light, until its tensors are read (CacheStream._materialize)."""
    unit: tuple[int, int]
    row: int
    size: tuple[int, ...]      # (h, w), then each reference's (h, w)
    sample: Sample | None


class CacheStream(IterableDataset):
    """Infinite stream of training batches from one cache, for one rank.

    `position` (from `StreamPosition.state_dict`) resumes where a previous run stopped. With
    `latent_logvar` the batches also carry the posterior's log-variance (flow.latent: sample).
    A remote cache's next `read_ahead` row groups are fetched while the current one is consumed."""

    def __init__(self, cache_dir, *, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle_buffer: int = 256, expected_text_mode: str | None = None, position: dict | None = None,
                 latent_logvar: bool = False, storage_options: dict | None = None, read_ahead: int = 2,
                 mask: bool = False):
        self.reader = open_cache(cache_dir, expected_text_mode, "training cache", latent_logvar, storage_options,
                                 mask)
        self.mask = mask
        self.references = reference_count(self.reader.manifest)
        self.read_ahead = read_ahead
        self.latent_logvar = latent_logvar
        self.text_mode = self.reader.text_mode
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.position = position or {}
        self._row_groups: list[int] | None = None

    # -- the plan of an epoch -----------------------------------------------------------------
    def row_groups(self) -> list[int]:
        """Row groups per shard, from each shard's footer (also catches truncated shards early)."""
        if self._row_groups is None:
            self._row_groups = [meta.num_row_groups for meta in self.reader.footers()]
        return self._row_groups

    def units(self, epoch: int, slot: int, num_slots: int) -> list[tuple[int, int]]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.reader.shards))
        counts = self.row_groups()
        every = [(int(s), g) for s in order for g in range(counts[s])]
        if not every:
            raise CacheError(f"{self.reader.dir}: the cache holds no rows (flux-prep inspect shows what its "
                             "encode skipped)")
        if len(every) < num_slots:
            raise CacheError(f"{self.reader.dir}: {len(every)} row groups cannot feed {num_slots} readers "
                             "(processes x DataLoader workers): use fewer processes, or encode with a smaller "
                             "--rows-per-shard (a row group holds at most that many rows)")
        return every[slot::num_slots]

    # -- reading ------------------------------------------------------------------------------
    def _read(self, unit: tuple[int, int], light: bool) -> list[StreamItem]:
        """One row group's items, without their tensors when `light`."""
        shard = self.reader.shards[unit[0]]
        n_refs = self.references
        if light:
            table = self.reader.table(shard, unit[1], columns=size_columns(n_refs))
            cols = {c: table.column(c).to_pylist() for c in size_columns(n_refs)}
            return [StreamItem(unit, i, bucket_size(cols, i, n_refs), None) for i in range(table.num_rows)]
        rg = self.reader.row_group(shard, unit[1])
        if self.latent_logvar and rg.get("latent_logvar") is None:
            raise CacheError(f"{self.reader.url_of(shard)}: row group {unit[1]} has no latent_logvar values")
        return [StreamItem(unit, i, bucket_size(rg, i, n_refs),
                           _sample(rg, i, self.reader.family.text, self.latent_logvar, self.mask, n_refs, alts=True))
                for i in range(len(rg["key"]))]

    def _materialize(self, items: list[StreamItem]) -> None:
        """Read the tensors of items that were replayed light (after a resume)."""
        by_unit: dict = {}
        for it in items:
            if it.sample is None:
                by_unit.setdefault(it.unit, []).append(it)
        for unit, its in by_unit.items():
            full = self._read(unit, light=False)
            for it in its:
                it.sample = full[it.row].sample

    # -- the stream ---------------------------------------------------------------------------
    def epoch_batches(self, epoch: int, slot: int, num_slots: int, skip: int = 0):
        """Yield (index, items) for one slot's epoch, from batch `skip` on."""
        rng = np.random.default_rng([self.seed, epoch, slot, 1])
        buffer: list[StreamItem] = []
        buckets: dict[tuple, list[StreamItem]] = {}
        index = 0
        light = skip > 0
        current: list[StreamItem] = []   # the row group being read (its rest is still light after a replay)

        def emit(item):
            bucket = buckets.setdefault(item.size, [])
            bucket.append(item)
            if len(bucket) < self.batch_size:
                return None
            buckets[item.size] = []
            return bucket

        def advance(batch):
            # Returns the batch to yield (or None while replaying), then moves the index on.
            nonlocal index, light
            out = batch if index >= skip else None
            index += 1
            if light and index == skip:
                self._materialize(buffer + current + [it for b in buckets.values() for it in b])
                light = False
            return out

        units = self.units(epoch, slot, num_slots)
        for k, unit in enumerate(units):
            if not light:
                for ahead in units[k:k + 1 + self.read_ahead]:
                    self.reader.prefetch(self.reader.shards[ahead[0]], ahead[1])
            current = self._read(unit, light)
            for item in current:
                if len(buffer) < self.shuffle_buffer:
                    buffer.append(item)
                    continue
                j = int(rng.integers(len(buffer)))
                item, buffer[j] = buffer[j], item
                batch = emit(item)
                if batch is not None and (out := advance(batch)) is not None:
                    yield index - 1, out
        current = []
        for j in rng.permutation(len(buffer)):
            batch = emit(buffer[j])
            if batch is not None and (out := advance(batch)) is not None:
                yield index - 1, out
        for size in sorted(buckets):
            if buckets[size] and (out := advance(fill_batch(buckets[size], self.batch_size))) is not None:
                yield index - 1, out

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # The DataLoader takes batches from its workers round-robin starting at worker 0; a resumed
        # run rotates the roles so that the one due next in the interrupted run goes first.
        worker = (worker + self.position.get("next_worker", 0)) % num_workers
        saved = self.position.get("workers", {}).get(str(worker))
        if self.position and self.position.get("num_workers", num_workers) != num_workers:
            raise CacheError(f"the checkpoint's data position was saved with {self.position['num_workers']} "
                             f"DataLoader workers, this run has {num_workers}; set data.num_workers to match")
        epoch, skip = (saved[0], saved[1]) if saved else (0, 0)
        slot, num_slots = self.rank * num_workers + worker, self.world_size * num_workers
        while True:
            for index, items in self.epoch_batches(epoch, slot, num_slots, skip):
                samples = pick_captions([it.sample for it in items], (self.seed, epoch, slot, index))
                batch = collate(samples, self.text_mode)
                batch.pos = torch.tensor([worker, epoch, index], dtype=torch.int64)
                yield batch
            epoch, skip = epoch + 1, 0


def fill_batch(items: list, batch_size: int) -> list:
    """A size's last batch of an epoch, its samples repeated in turn up to `batch_size`.

    With aspect-ratio buckets a small dataset has many sizes of a few samples each (21 images in 9
    buckets: 1.9 per batch at batch_size 4). Repeats keep every step at batch_size samples (each with its
    own noise and timestep) and each sample's weight in its step about as it was: the loss is a batch
    mean, so a sample alone in a batch of 1 weighed what its 4 copies weigh now. Merging buckets would
    crop or resize latents (other pictures than the ones encoded); carrying the rest into the next epoch
    would tie each epoch to the last, and a resume to every epoch before it."""
    return [items[i % len(items)] for i in range(max(batch_size, len(items)))]


def _sample(rg: dict, i: int, spec, latent_logvar: bool = False, mask: bool = False, references: int = 0,
            alts: bool = False) -> Sample:
    """Row i of a row group; `alts`: with its other captions (a training stream's; validation takes the first)."""
    # Clones: a view would keep its whole row group alive while the sample waits in the buffer.
    def pick(x):
        return x[i].clone()
    others = ()
    if alts and alt_name(spec.states) in rg:
        others = tuple((t.clone(), rg[alt_name(spec.pooled)][i][j].clone() if spec.pooled else None, int(n))
                       for j, (t, n) in enumerate(zip(rg[alt_name(spec.states)][i], rg[alt_name(spec.length)][i])))
    return Sample(key=rg["key"][i], latent=pick(rg["latent"]), text=pick(rg[spec.states]),
                  pooled=pick(rg[spec.pooled]) if spec.pooled else None, text_len=int(rg[spec.length][i]),
                  latent_logvar=pick(rg["latent_logvar"]) if latent_logvar else None,
                  mask=pick(rg["mask"]) if mask else None, refs=pick_references(rg, i, references), alts=others)

# The caption draws' own stream of a batch's generator (the shuffle buffer's is 1).
CAPTION_STREAM = 2


def pick_captions(samples: list[Sample], place: tuple) -> list[Sample]:
    """One caption per sample of a batch, uniform over its row's captions (the cached first and its
    `alts`), from a generator seeded by the batch's place in the stream (seed, epoch, slot, index): a
    resumed run, which replays the stream to that place, draws what the interrupted one drew. A batch of
    rows of one caption draws nothing and is returned as it came."""
    if not any(s.alts for s in samples):
        return samples
    rng = np.random.default_rng([*place, CAPTION_STREAM])
    out = []
    for s in samples:
        j = int(rng.integers(1 + len(s.alts)))
        out.append(s if j == 0 else replace(s, text=s.alts[j - 1][0], pooled=s.alts[j - 1][1],
                                            text_len=s.alts[j - 1][2]))
    return out


class StreamPosition:
    """The trainer's record of what it consumed: per worker (epoch, next batch index), the worker
    due next, samples seen."""

    def __init__(self, num_workers: int, world_size: int):
        self.num_workers, self.world_size = max(1, num_workers), world_size
        self.workers: dict[str, list[int]] = {}
        self.next_worker = 0
        self.samples = 0

    def consumed(self, batch: TrainBatch) -> None:
        worker, epoch, index = (int(v) for v in batch.pos)
        self.workers[str(worker)] = [epoch, index + 1]
        self.next_worker = (worker + 1) % self.num_workers
        self.samples += len(batch.key)

    @property
    def epoch(self) -> int:
        return min((e for e, _ in self.workers.values()), default=0)

    def state_dict(self) -> dict:
        return {"num_workers": self.num_workers, "world_size": self.world_size,
                "workers": dict(self.workers), "next_worker": self.next_worker, "samples": self.samples}

    def load_state_dict(self, state: dict) -> None:
        if state.get("sources"):
            raise CacheError("the checkpoint's data position is of several training caches (a list in "
                             "data.train_cache); resume with the same list")
        if state.get("world_size", self.world_size) != self.world_size:
            raise CacheError(f"the checkpoint's data position was saved by {state['world_size']} processes, "
                             f"this run has {self.world_size}; resume with the same number")
        # Each worker's stream is one slot of the epoch's deal: another count deals other row groups.
        if state.get("num_workers", self.num_workers) != self.num_workers:
            raise CacheError(f"the checkpoint's data position was saved with {state['num_workers']} DataLoader "
                             f"workers, this run has {self.num_workers}; set data.num_workers to match")
        self.workers = {k: list(v) for k, v in state.get("workers", {}).items()}
        self.next_worker = int(state.get("next_worker", 0))
        self.samples = int(state.get("samples", 0))


def usable_workers(reader: CacheReader, num_workers: int, world_size: int) -> int:
    """The DataLoader workers per process that the cache can feed. Each (process, worker) reads whole
    row groups, so a small cache (a LoRA user's 20 images are one row group) feeds fewer workers than
    asked, down to 0 (the main process reads). Footers are read only until there are enough."""
    need, groups = world_size * max(1, num_workers), 0
    for shard in reader.shards:
        groups += reader.footer(shard).num_row_groups
        if groups >= need:
            return num_workers
    return min(num_workers, groups // world_size)


def train_loader(stream: CacheStream, num_workers: int, pin_memory: bool,
                 prefetch_factor: int = DataConfig.prefetch_factor) -> DataLoader:
    """The DataLoader over the stream. Its workers' seeds come from a generator of its own: drawn from
    the global one, they would shift the numbers that stochastic rounding draws after a resume."""
    kwargs = {"prefetch_factor": prefetch_factor, "persistent_workers": False,
              "worker_init_fn": _ignore_sigint} if num_workers > 0 else {}
    return DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(stream.seed), **kwargs)


def _ignore_sigint(worker_id: int) -> None:
    """Ctrl-C reaches the workers too (a terminal signals the whole group): they keep serving the step
    that the trainer finishes before it stops (train/launch.py's StopRequest); they end with the loader."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)

# -- validation ------------------------------------------------------------------------------
def sample_seed(key: str, salt: int = 0) -> int:
    """A seed fixed by the sample's key: the same noise on every rerun, at any world size."""
    return int.from_bytes(hashlib.sha256(f"{key}|{salt}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def validation_batches(reader: CacheReader, batch_size: int, rank: int = 0, world_size: int = 1,
                       max_samples: int | None = None):
    """The held-out cache in manifest order; sample i goes to rank i % world_size; one latent size per
    batch. With `max_samples`, only the first max_samples samples are read: nothing after them is decoded."""
    buckets: dict[tuple, list] = {}
    n_refs = reference_count(reader.manifest)
    for i, (rg, r) in enumerate(_validation_rows(reader, max_samples)):
        if i % world_size == rank:
            size = bucket_size(rg, r, n_refs)
            bucket = buckets.setdefault(size, [])
            bucket.append(_sample(rg, r, reader.family.text, references=n_refs))
            if len(bucket) == batch_size:
                yield collate(bucket, reader.text_mode)
                buckets[size] = []
    for size in sorted(buckets):
        if buckets[size]:
            yield collate(buckets[size], reader.text_mode)


def _validation_rows(reader: CacheReader, max_samples: int | None):
    """(row group, row) of the held-out cache in manifest order, stopping after `max_samples`."""
    i = 0
    for shard in reader.shards:
        if max_samples is not None and i >= max_samples:
            return
        meta = reader.footer(shard)
        for g in range(meta.num_row_groups):
            if max_samples is not None and i >= max_samples:
                return
            if g + 1 < meta.num_row_groups and (max_samples is None or i + meta.row_group(g).num_rows < max_samples):
                reader.prefetch(shard, g + 1)
            rg = reader.row_group(shard, g)
            for r in range(len(rg["key"])):
                if max_samples is not None and i >= max_samples:
                    return
                yield rg, r
                i += 1
