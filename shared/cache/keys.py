"""A key is never in a cache twice: checked from the `key` column alone (a few bytes a row)."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq


class KeyReadError(Exception):
    """A shard whose keys cannot be read."""


def _shard_keys(path: Path) -> pa.Array:
    try:
        table = pq.ParquetFile(path, page_checksum_verification=True).read(columns=["key"])
    except Exception as e:  # pyarrow raises several types for damaged files
        raise KeyReadError(f"{path}: key column unreadable ({e})") from None
    return table.column("key").combine_chunks()


def duplicate_keys(cache_dir, shard_paths: list[str], limit: int = 3) -> list[str]:
    """One line per repeated key (the first `limit`, then a count of the rest), naming the shards
    that hold it; an empty list when every key of these shards is unique."""
    keys = [_shard_keys(Path(cache_dir) / p) for p in shard_paths]
    every = pa.chunked_array(keys, pa.string())
    if len(every) == 0 or pc.count_distinct(every).as_py() == len(every):
        return []
    counts = pc.value_counts(every)
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    lines = []
    for key, n in zip(repeated.field("values")[:limit].to_pylist(), repeated.field("counts")[:limit].to_pylist()):
        holders = [p for p, k in zip(shard_paths, keys) if pc.any(pc.equal(k, key)).as_py()]
        lines.append(f"key {key!r} is in {n} rows, of {', '.join(holders)}")
    if len(repeated) > limit:
        lines.append(f"and {len(repeated) - limit} more repeated keys")
    return lines
