"""A key is never in a cache twice: checked from the `key` column alone (a few bytes a row)."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from .store import open_store


class KeyReadError(Exception):
    """A shard whose keys cannot be read."""


def _shard_keys(store, name: str) -> pa.Array:
    try:
        with store.open_parquet(name, page_checksum_verification=True) as pf:
            table = pf.read(columns=["key"])
    except Exception as e:  # pyarrow raises several types for damaged files
        raise KeyReadError(f"{store.url_of(name)}: key column unreadable ({e})") from None
    return table.column("key").combine_chunks()


def duplicate_keys(cache_dir, shard_paths: list[str], limit: int = 3) -> list[str]:
    """One line per repeated key (the first `limit`, then a count of the rest), naming the shards
    that hold it; an empty list when every key of these shards is unique."""
    store = open_store(cache_dir)
    keys = store.map(lambda p: _shard_keys(store, p), shard_paths)
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
