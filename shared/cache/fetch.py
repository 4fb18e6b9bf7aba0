"""Row groups of remote shards: each fetched in one ranged read, the next ones ahead in threads.

pyarrow reading a Parquet file through an fsspec file asks for each column chunk in turn, and a
round trip to an object store costs milliseconds to tens of them; a trainer's DataLoader worker
waited on each. Here the byte range of a row group's chunks (they are contiguous: the writer
puts one row group's columns side by side) is read with one request, in a background thread
started as soon as the reader knows it will need the group (`prefetch`), and pyarrow parses it
from memory (fsspec's "parts" cache), checking the page CRCs as it would on disk. The footer,
read once per shard, comes from the shard's last bytes, whose position the manifest's size gives
without a request for the object's size.
"""
from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq

from .manifest import CacheError

FOOTER_GUESS = 64 << 10   # bytes read from a shard's end for its footer (a second read when it is longer)
FETCH_THREADS = 4


def read_remote_footer(store, shard: str, size: int) -> pq.FileMetaData:
    """A remote shard's footer, from its last bytes; CacheError naming the object when it is
    missing, shorter than the manifest says, or not Parquet there."""
    url = store.url_of(shard)
    want = min(size, FOOTER_GUESS)
    try:
        tail = store.read_range(shard, size - want, size)
        if len(tail) == want >= 8 and tail[-4:] == b"PAR1":
            need = int.from_bytes(tail[-8:-4], "little") + 8
            if want < need <= size:
                tail = store.read_range(shard, size - need, size)
                want = need
    except FileNotFoundError:
        raise CacheError(f"{url}: shard listed in the manifest is missing") from None
    except OSError as e:
        raise CacheError(f"{url}: unreadable ({type(e).__name__}: {e})") from None
    if len(tail) != want or want < 8 or tail[-4:] != b"PAR1":
        raise CacheError(f"{url}: no Parquet footer where the manifest's size ({size} bytes) puts it "
                         "(truncated or altered)")
    try:
        return pq.read_metadata(pa.BufferReader(tail))
    except Exception as e:  # pyarrow raises several types for damaged footers
        raise CacheError(f"{url}: not a readable Parquet shard ({e})") from None


def chunk_ranges(meta: pq.FileMetaData, index: int, columns: list[str] | None) -> list[tuple[int, int]]:
    """The byte ranges of a row group's column chunks (the named columns, or all), adjacent ones merged."""
    group = meta.row_group(index)
    ranges = []
    for c in range(group.num_columns):
        col = group.column(c)
        if columns is not None and col.path_in_schema not in columns:
            continue
        start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
        ranges.append((start, start + col.total_compressed_size))
    merged: list[list[int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


class RowGroupFetcher:
    """Fetches and parses row groups of one remote cache; `prefetch` starts one in a thread, `table`
    returns it (fetching it now if it was not prefetched). Threads are started per process."""

    def __init__(self, store, footer, sizes: dict[str, int], threads: int = FETCH_THREADS):
        """`footer(shard)`: the shard's FileMetaData; `sizes`: shard -> bytes (the manifest's)."""
        self.store, self.footer, self.sizes, self.threads = store, footer, sizes, threads
        self._pool: ThreadPoolExecutor | None = None
        self._pid = None
        self._pending: dict[tuple, Future] = {}

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None or self._pid != os.getpid():
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="cache-fetch")
            self._pid, self._pending = os.getpid(), {}
        return self._pool

    def prefetch(self, shard: str, index: int, columns: list[str] | None = None) -> None:
        key = (shard, index, tuple(columns) if columns else None)
        pool = self._executor()
        if key not in self._pending:
            self._pending[key] = pool.submit(self._fetch, shard, index, columns)

    def table(self, shard: str, index: int, columns: list[str] | None = None) -> pa.Table:
        key = (shard, index, tuple(columns) if columns else None)
        self._executor()
        future = self._pending.pop(key, None)
        return future.result() if future is not None else self._fetch(shard, index, columns)

    def _fetch(self, shard: str, index: int, columns: list[str] | None) -> pa.Table:
        from fsspec.parquet import AlreadyBufferedFile
        meta = self.footer(shard)
        url = self.store.url_of(shard)
        ranges = chunk_ranges(meta, index, columns)
        try:
            parts = {(a, b): self.store.read_range(shard, a, b) for a, b in ranges}
        except FileNotFoundError:
            raise CacheError(f"{url}: shard listed in the manifest is missing") from None
        except OSError as e:
            raise CacheError(f"{url}: row group {index} unreadable ({type(e).__name__}: {e})") from None
        short = [(a, b) for (a, b), data in parts.items() if len(data) != b - a]
        if short:
            raise CacheError(f"{url}: row group {index}: bytes {short[0][0]}-{short[0][1]} cut short "
                             "(the object is shorter than its footer says)")
        # strict: a read outside the fetched ranges is an error, never zero bytes.
        f = AlreadyBufferedFile(fs=None, path=url, mode="rb", cache_type="parts",
                                cache_options={"data": parts, "strict": True}, size=self.sizes[shard])
        try:
            return pq.ParquetFile(f, metadata=meta, page_checksum_verification=True).read_row_group(
                index, columns=columns)
        except Exception as e:  # pyarrow raises several types for damaged pages
            raise CacheError(f"{url}: row group {index} unreadable ({e})") from None
