"""Mixed datasets: several training caches, each batch drawn from one of them by weight.

`data.train_cache` is one cache (a string: the stream of data.py, as always) or a list of sources,
`[{cache: A, weight: 0.7}, {cache: B, weight: 0.3, loss_weight: 1.0}]`: regularisation / prior-preservation
images, several resolutions, several sources. Each source is its own CacheStream (its own shuffle, epochs
and buckets); a batch comes whole from one source, so it has one latent size and one text layout as before.
Which source gives a slot's (rank x DataLoader worker) k-th batch is drawn from a generator seeded by
(run.seed, slot, k): the same mix on every run, at any point of it, and a resume needs only each slot's k and
each source's own stream position (MixedPosition). `loss_weight` multiplies the loss of that source's batches
(the logged loss is the weighted one). The caches must be encoded alike (family, encoders, VAE, dims, text
mode and max length): mixing other tensors would train on the difference, so that is refused naming both.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from shared.cache import CacheError
from shared.params import ConfigError

from .batch import TrainBatch
from .data import CacheStream, StreamPosition, encoding_facts

SOURCE_KEYS = ("cache", "weight", "loss_weight")


@dataclass(frozen=True)
class Source:
    cache: str
    weight: float = 1.0
    loss_weight: float = 1.0


def parse_sources(train_cache) -> list[Source]:
    """data.train_cache as its sources: a string is one source of weight 1."""
    if isinstance(train_cache, str):
        return [Source(train_cache)]
    if not train_cache:
        raise ConfigError("data.train_cache is an empty list; give a cache, or a list of {cache, weight}")
    out = []
    for i, entry in enumerate(train_cache):
        where = f"data.train_cache[{i}]"
        if not isinstance(entry, dict) or not entry.get("cache"):
            raise ConfigError(f"{where}: give {{cache: FOLDER_OR_URL, weight: W}}, not {entry!r}")
        unknown = sorted(set(entry) - set(SOURCE_KEYS))
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r} (keys: {', '.join(SOURCE_KEYS)})")
        try:
            source = Source(str(entry["cache"]), float(entry.get("weight", 1.0)), float(entry.get("loss_weight", 1.0)))
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: weight and loss_weight are numbers") from None
        if source.weight <= 0 or source.loss_weight < 0:
            raise ConfigError(f"{where}: weight must be above 0 and loss_weight at least 0")
        out.append(source)
    return out


def check_alike(readers: list, sources: list[Source]) -> None:
    """Refuse caches encoded otherwise than the first one, naming both and each difference."""
    first = encoding_facts(readers[0])
    for reader, source in zip(readers[1:], sources[1:]):
        theirs = encoding_facts(reader)
        diffs = [f"{k}: {theirs.get(k)!r} ({sources[0].cache}: {first.get(k)!r})"
                 for k in dict.fromkeys([*first, *theirs]) if first.get(k) != theirs.get(k)]
        if diffs:
            raise CacheError(f"data.train_cache: {source.cache} was encoded otherwise than {sources[0].cache}: "
                             + "; ".join(diffs))


def draw_source(seed: int, slot: int, k: int, weights: np.ndarray) -> int:
    """The source of slot `slot`'s k-th batch: one draw of its own generator, by weight."""
    u = np.random.default_rng([seed, slot, k, 7]).random()
    return int(min(np.searchsorted(np.cumsum(weights), u * weights.sum(), side="right"), len(weights) - 1))


class MixedStream(IterableDataset):
    """The batches of several CacheStreams, each batch's source drawn by weight; `pos` grows to
    (worker, epoch, index, source, k): the source's own position, then which source and the slot's k."""

    def __init__(self, streams: list[CacheStream], weights: list[float], position: dict | None = None):
        self.streams, self.weights = streams, np.asarray(weights, dtype=np.float64)
        self.seed, self.rank = streams[0].seed, streams[0].rank
        self.position = position or {}

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        next_worker = self.position.get("next_worker", 0)
        worker = (worker + next_worker) % num_workers   # as CacheStream rotates it
        k = int(self.position.get("mix", {}).get(str(worker), 0))
        for stream, state in zip(self.streams, self.position.get("sources") or [{}] * len(self.streams)):
            stream.position = {"num_workers": self.position.get("num_workers", num_workers),
                               "next_worker": next_worker, "workers": state} if self.position else {}
        batches = [iter(s) for s in self.streams]   # each replays its own epoch on its first batch
        slot = self.rank * num_workers + worker
        while True:
            src = draw_source(self.seed, slot, k, self.weights)
            batch = next(batches[src])
            batch.pos = torch.cat([batch.pos, torch.tensor([src, k], dtype=torch.int64)])
            yield batch
            k += 1


class MixedPosition(StreamPosition):
    """StreamPosition of a mixed stream: per source, per worker (epoch, next index); per worker the next k."""

    def __init__(self, num_workers: int, world_size: int, num_sources: int):
        super().__init__(num_workers, world_size)
        self.sources: list[dict[str, list[int]]] = [{} for _ in range(num_sources)]

    def consumed(self, batch: TrainBatch) -> None:
        worker, epoch, index, src, k = (int(v) for v in batch.pos)
        self.sources[src][str(worker)] = [epoch, index + 1]
        self.workers[str(worker)] = k + 1   # the mix's own position (also what says "resumed")
        self.next_worker = (worker + 1) % self.num_workers
        self.samples += len(batch.key)

    @property
    def epoch(self) -> int:
        """The first source's epoch (the main data; a small regularisation set turns over faster)."""
        return min((e for e, _ in self.sources[0].values()), default=0)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "mix": dict(self.workers), "workers": {},
                "sources": [dict(s) for s in self.sources]}

    def load_state_dict(self, state: dict) -> None:
        if len(state.get("sources") or []) != len(self.sources):
            raise CacheError(f"the checkpoint's data position is of {len(state.get('sources') or []) or 1} training "
                             f"cache(s), data.train_cache now lists {len(self.sources)}: resume with the same list")
        super().load_state_dict({**state, "workers": {}, "sources": None})
        self.workers = {w: int(k) for w, k in state["mix"].items()}
        self.sources = [{w: list(v) for w, v in s.items()} for s in state["sources"]]


def loss_weight(batch: TrainBatch, sources: list[Source]) -> float:
    """The loss weight of the source a batch came from (1 for a single cache)."""
    return sources[int(batch.pos[3])].loss_weight if batch.pos is not None and len(batch.pos) > 3 else 1.0
