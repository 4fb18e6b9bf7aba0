"""Encode's progress bar: samples read (rows written and samples skipped) against a total estimated
from the input shards, so that it shows an ETA.

A folder shard knows its samples. A tar's are estimated from the samples per byte of the tars measured
so far: before any is encoded, the first local tar's member headers are counted (a seek per member,
no data read); each tar encoded then replaces the estimate with what it held."""
from __future__ import annotations

import sys
import tarfile
from pathlib import Path

from .sources import InputShard, split_key


class EncodeBar:
    def __init__(self, todo: list[InputShard], rank: int, already_done: int):
        from tqdm import tqdm
        self.shards = {s.id: s for s in todo}
        self.read: dict[str, int] = {s.id: 0 for s in todo}     # samples read so far, per shard
        self.finished: set[str] = set()
        self.measured: dict[str, tuple[int, int]] = {}          # tar id -> (samples, bytes)
        first_tar = next((s for s in todo if not s.files), None)
        if first_tar is not None and (count := count_local_tar_samples(first_tar.url)) is not None:
            self.measured[first_tar.id] = (count, _size(first_tar) or 0)
        done = f" ({already_done} shards already done)" if already_done else ""
        self.bar = tqdm(total=self.total(), desc=f"encode[rank {rank}]{done}", unit="img", position=rank,
                        dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 30.0)

    def total(self) -> int | None:
        """Samples of the finished shards plus the estimate of the others (None: no tar measured yet)."""
        total = 0
        for shard_id, shard in self.shards.items():
            if shard_id in self.finished:
                total += self.read[shard_id]
                continue
            estimate = self._estimate(shard)
            if estimate is None:
                return None
            total += max(estimate, self.read[shard_id])
        return total

    def _estimate(self, shard: InputShard) -> int | None:
        if shard.files:
            return len(shard.files)
        if not self.measured:
            return None
        samples = sum(n for n, _ in self.measured.values())
        nbytes = sum(b for _, b in self.measured.values())
        size = _size(shard)
        if size and nbytes and all(b for _, b in self.measured.values()):
            return round(size * samples / nbytes)
        return round(samples / len(self.measured))   # sizes unknown: the mean tar

    def advance(self, shard_id: str, samples: int, shard_end: bool, **postfix) -> None:
        """`samples` more read from `shard_id`; `shard_end`: that was its last batch."""
        self.read[shard_id] += samples
        if shard_end:
            self.finished.add(shard_id)
            shard = self.shards[shard_id]
            if not shard.files:
                self.measured[shard_id] = (self.read[shard_id], _size(shard) or 0)
            self.bar.total = self.total()
        self.bar.update(samples)
        self.bar.set_postfix(refresh=False, **postfix)

    def close(self) -> None:
        self.bar.close()


def _size(shard: InputShard) -> int | None:
    size = shard.fingerprint.get("size")
    return int(size) if size else None


def count_local_tar_samples(url: str) -> int | None:
    """The samples (distinct keys of its files) of an uncompressed local tar, from its member headers;
    None for another tar (compressed, remote) or an unreadable one."""
    path = Path(url[len("file://"):] if url.startswith("file://") else url)
    if "://" in url[:12] and not url.startswith("file://") or path.suffix != ".tar" or not path.is_file():
        return None
    try:
        with tarfile.open(path, mode="r:") as tar:
            return len({split_key(m.name)[0] for m in tar if m.isfile()})
    except (tarfile.TarError, OSError):
        return None
