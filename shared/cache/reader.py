"""Reading the cache: a row group at a time, into tensors, with one copy of the bytes.

Arrow keeps a binary column as one data buffer plus offsets; we copy that buffer once
into a torch tensor and hand out per-row views (or one stacked view when every row has
the same shape, as padded T5, CLIP and one-size latents do).
"""
from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .alt_captions import alt_name, decode_alt
from .fetch import RowGroupFetcher, read_remote_footer
from .manifest import CacheError, read_manifest
from .schema import EMPTY_PROMPT_NAME, SCHEMA_VERSION, array_to_tensor, numpy_dtype
from .store import open_store


def decode_binary_column(arr, dtype_name: str, shapes: list[tuple[int, ...]]):
    """A binary Arrow column -> [N, *shape] tensor (same shapes) or a list of tensors.

    Returns None when every value is null (an optional column left out)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    n = len(arr)
    if arr.null_count == n and n > 0:
        return None
    if arr.null_count:
        raise CacheError("a tensor column has missing values in some rows only")
    _, offsets_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int32, count=n + 1, offset=arr.offset * 4)
    np_dtype = numpy_dtype(dtype_name)
    start, end = int(offsets[0]), int(offsets[-1])
    flat = array_to_tensor(np.frombuffer(data_buf, dtype=np_dtype, count=(end - start) // np_dtype.itemsize,
                                         offset=start), dtype_name)
    elem = (offsets - start) // np_dtype.itemsize
    sizes = np.diff(elem)
    expected = np.array([int(np.prod(s)) for s in shapes])
    if not np.array_equal(sizes, expected):
        bad = int(np.nonzero(sizes != expected)[0][0])
        raise CacheError(f"row {bad}: {sizes[bad]} values stored, shape {shapes[bad]} expected")
    if n and all(s == shapes[0] for s in shapes):
        return flat.view(n, *shapes[0])
    return [flat[elem[i]:elem[i + 1]].view(shapes[i]) for i in range(n)]


def decode_table(table: pa.Table, manifest: dict) -> dict:
    """A Parquet table (usually one row group) -> a dict of lists and tensors, by column name.

    latent: [N, C, h, w] or a list of [C, h, w]; the text states (FLUX.1's "t5"): [N, L, D] (padded) or a
    list of [len_i, D] (trimmed); a pooled vector ("clip"): [N, D]; the text length ("t5_len"), latent_h/w,
    width, height: int64 tensors. A shard with rows of several captions adds their list columns
    (alt_captions.decode_alt: `caption_alt`, `t5_alt`, ...: per-row lists)."""
    from ..family import family_of_manifest
    spec = family_of_manifest(manifest).text
    dims, dtypes = manifest["dims"], manifest["dtypes"]
    lh = table.column("latent_h").to_numpy().astype(np.int64)
    lw = table.column("latent_w").to_numpy().astype(np.int64)
    lengths = table.column(spec.length).to_numpy().astype(np.int64)
    n = table.num_rows
    latent_shapes = [(dims["latent_channels"], int(h), int(w)) for h, w in zip(lh, lw)]
    states_dim = dims[spec.dim_keys()[spec.states]]
    text = spec.settings(manifest)
    if text["mode"] == "padded":
        states_shapes = [(text["max_length"], states_dim)] * n
    else:
        states_shapes = [(int(length), states_dim) for length in lengths]
    out = {
        "key": table.column("key").to_pylist(),
        "caption": table.column("caption").to_pylist(),
        "latent": decode_binary_column(table.column("latent"), dtypes["latent"], latent_shapes),
        spec.states: decode_binary_column(table.column(spec.states), dtypes[spec.states], states_shapes),
    }
    if spec.pooled:
        out[spec.pooled] = decode_binary_column(table.column(spec.pooled), dtypes[spec.pooled],
                                                [(dims[spec.dim_keys()[spec.pooled]],)] * n)
    out.update({
        spec.length: torch.from_numpy(lengths),
        "latent_h": torch.from_numpy(lh),
        "latent_w": torch.from_numpy(lw),
        "width": torch.from_numpy(table.column("width").to_numpy().astype(np.int64)),
        "height": torch.from_numpy(table.column("height").to_numpy().astype(np.int64)),
    })
    if "mask" in table.column_names:   # the loss mask [h, w] (encode --masks)
        out["mask"] = decode_binary_column(table.column("mask"), dtypes["mask"], [sh[1:] for sh in latent_shapes])
    from .references import decode_references
    out.update(decode_references(table, manifest, decode_binary_column))   # ref{i}_*: none in a plain cache
    if "latent_logvar" in table.column_names:
        out["latent_logvar"] = decode_binary_column(
            table.column("latent_logvar"), dtypes.get("latent_logvar", dtypes["latent"]), latent_shapes)
    if alt_name(spec.states) in table.column_names:   # a shard with rows of several captions
        padded = text["mode"] == "padded"
        out.update(decode_alt(table, spec, lambda n: (text["max_length"] if padded else n, states_dim),
                              decode_binary_column, dtypes,
                              dims[spec.dim_keys()[spec.pooled]] if spec.pooled else None))
    return out


class CacheReader:
    """A cache (a folder or a URL, `storage_options` for its file system) opened for reading:
    manifest, shard names, footers, row groups as tensors. Remote row groups are fetched whole, each
    in one ranged read, and `prefetch` starts the next ones in background threads (fetch.py)."""

    def __init__(self, cache_dir, storage_options: dict | None = None):
        self.store = open_store(cache_dir, storage_options)
        self.dir = self.store.url
        self.manifest = read_manifest(self.store)
        self.shards = [s["path"] for s in self.manifest["shards"]]
        self.num_rows = sum(s["rows"] for s in self.manifest["shards"])
        from ..family import family_of_manifest
        self.family = family_of_manifest(self.manifest)
        self.text_mode = self.family.text.settings(self.manifest)["mode"]
        self._entries = {s["path"]: s for s in self.manifest["shards"]}
        self._footers: dict[str, pq.FileMetaData] = {}
        self._fetcher = self._new_fetcher()
        self._local_file = None    # (pid, shard, ParquetFile): the local shard being read

    def __getstate__(self):
        # DataLoader workers get a copy: leave open files and threads behind.
        return {**self.__dict__, "_local_file": None, "_fetcher": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._fetcher = self._new_fetcher()

    def _new_fetcher(self) -> RowGroupFetcher | None:
        if not self.store.remote:
            return None
        return RowGroupFetcher(self.store, self.footer, {s: e["bytes"] for s, e in self._entries.items()})

    def url_of(self, shard: str) -> str:
        return self.store.url_of(shard)

    def footer(self, shard: str) -> pq.FileMetaData:
        """A shard's Parquet footer (read once), after checking the shard is there and of this schema."""
        if shard not in self._footers:
            meta = (read_remote_footer(self.store, shard, self._entries[shard]["bytes"]) if self.store.remote
                    else self._local_parquet(shard).metadata)
            _check_version(meta.schema.to_arrow_schema().metadata, self.url_of(shard))
            self._footers[shard] = meta
        return self._footers[shard]

    def footers(self, shards: list[str] | None = None) -> list[pq.FileMetaData]:
        """The footers of `shards` (all by default), several read at once from a remote store."""
        return self.store.map(self.footer, self.shards if shards is None else shards)

    def open_shard(self, shard: str) -> pq.ParquetFile:
        if self.store.remote:
            meta = self.footer(shard)
            return self.store.open_parquet(shard, metadata=meta, page_checksum_verification=True)
        pf = self._local_parquet(shard)
        _check_version(pf.schema_arrow.metadata, self.url_of(shard))
        return pf

    def _local_parquet(self, shard: str) -> pq.ParquetFile:
        path = self.store.path(shard)
        if not path.is_file():
            raise CacheError(f"{path}: shard listed in the manifest is missing")
        try:
            # Every page read is checked against the CRC the writer stored (shards without CRCs,
            # written before the writer stored them, are read unchecked).
            return pq.ParquetFile(path, page_checksum_verification=True)
        except Exception as e:  # pyarrow raises several types for damaged files
            raise CacheError(f"{path}: not a readable Parquet shard ({e})") from None

    def prefetch(self, shard: str, index: int) -> None:
        """Start fetching a row group that will be read soon (remote stores; local reads need no help)."""
        if self._fetcher is not None:
            self._fetcher.prefetch(shard, index)

    def table(self, shard: str, index: int, columns: list[str] | None = None) -> pa.Table:
        """One row group of one shard as an Arrow table (raises CacheError naming the shard)."""
        if self._fetcher is not None:
            return self._fetcher.table(shard, index, columns)
        pid = os.getpid()
        if self._local_file is None or self._local_file[:2] != (pid, shard):
            self._local_file = (pid, shard, self.open_shard(shard))
        try:
            return self._local_file[2].read_row_group(index, columns=columns)
        except Exception as e:  # pyarrow raises several types for damaged pages
            raise CacheError(f"{self.url_of(shard)}: row group {index} unreadable ({e})") from None

    def row_group(self, shard: str, index: int) -> dict:
        """One row group of one shard, decoded into tensors."""
        try:
            return decode_table(self.table(shard, index), self.manifest)
        except CacheError as e:
            message = str(e)
            raise CacheError(message if self.url_of(shard) in message else f"{self.url_of(shard)}: {message}") from None

    def iter_shard(self, shard: str):
        """Yield each row group of one shard as decoded tensors."""
        for i in range(self.footer(shard).num_row_groups):
            yield self.row_group(shard, i)

    def empty_prompt(self) -> dict:
        """The empty prompt's encodings by column (FLUX.1: t5 [L, D], clip [D], t5_len), for guidance
        dropout and CFG."""
        from safetensors.torch import load
        name = self.manifest.get("empty_prompt", EMPTY_PROMPT_NAME)
        try:
            return load(self.store.read_bytes(name))
        except FileNotFoundError:
            raise CacheError(f"{self.url_of(name)}: the empty-prompt encodings are missing") from None


def _check_version(metadata: dict | None, where: str) -> None:
    version = (metadata or {}).get(b"flux_prep_schema_version", b"?").decode()
    if version != str(SCHEMA_VERSION):
        raise CacheError(f"{where}: shard schema version {version}, expected {SCHEMA_VERSION}")
