"""Reading the cache: a row group at a time, into tensors, with one copy of the bytes.

Arrow keeps a binary column as one data buffer plus offsets; we copy that buffer once
into a torch tensor and hand out per-row views (or one stacked view when every row has
the same shape, as padded T5, CLIP and one-size latents do).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .manifest import CacheError, read_manifest
from .schema import EMPTY_PROMPT_NAME, SCHEMA_VERSION, array_to_tensor, numpy_dtype


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
    """A Parquet table (usually one row group) -> a dict of lists and tensors.

    latent: [N, C, h, w] or a list of [C, h, w]; t5: [N, L, D] (padded) or a list of
    [len_i, D] (trimmed); clip: [N, D]; t5_len, latent_h/w, width, height: int64 tensors."""
    dims, dtypes = manifest["dims"], manifest["dtypes"]
    lh = table.column("latent_h").to_numpy().astype(np.int64)
    lw = table.column("latent_w").to_numpy().astype(np.int64)
    t5_len = table.column("t5_len").to_numpy().astype(np.int64)
    c, t5_dim, clip_dim = dims["latent_channels"], dims["t5_dim"], dims["clip_dim"]
    n = table.num_rows
    latent_shapes = [(c, int(h), int(w)) for h, w in zip(lh, lw)]
    if manifest["t5"]["mode"] == "padded":
        t5_shapes = [(manifest["t5"]["max_length"], t5_dim)] * n
    else:
        t5_shapes = [(int(length), t5_dim) for length in t5_len]
    out = {
        "key": table.column("key").to_pylist(),
        "caption": table.column("caption").to_pylist(),
        "latent": decode_binary_column(table.column("latent"), dtypes["latent"], latent_shapes),
        "t5": decode_binary_column(table.column("t5"), dtypes["t5"], t5_shapes),
        "clip": decode_binary_column(table.column("clip"), dtypes["clip"], [(clip_dim,)] * n),
        "t5_len": torch.from_numpy(t5_len),
        "latent_h": torch.from_numpy(lh),
        "latent_w": torch.from_numpy(lw),
        "width": torch.from_numpy(table.column("width").to_numpy().astype(np.int64)),
        "height": torch.from_numpy(table.column("height").to_numpy().astype(np.int64)),
    }
    if "latent_logvar" in table.column_names:
        out["latent_logvar"] = decode_binary_column(
            table.column("latent_logvar"), dtypes.get("latent_logvar", dtypes["latent"]), latent_shapes)
    return out


class CacheReader:
    """A cache folder opened for reading: manifest, shard paths, row groups as tensors."""

    def __init__(self, cache_dir):
        self.dir = Path(cache_dir)
        self.manifest = read_manifest(self.dir)
        self.shards = [s["path"] for s in self.manifest["shards"]]
        self.num_rows = sum(s["rows"] for s in self.manifest["shards"])
        self.t5_mode = self.manifest["t5"]["mode"]

    def open_shard(self, shard: str) -> pq.ParquetFile:
        path = self.dir / shard
        if not path.is_file():
            raise CacheError(f"{path}: shard listed in the manifest is missing")
        try:
            # Every page read is checked against the CRC the writer stored (shards without CRCs,
            # written before the writer stored them, are read unchecked).
            pf = pq.ParquetFile(path, page_checksum_verification=True)
        except Exception as e:  # pyarrow raises several types for damaged files
            raise CacheError(f"{path}: not a readable Parquet shard ({e})") from None
        meta = pf.schema_arrow.metadata or {}
        version = meta.get(b"flux_prep_schema_version", b"?").decode()
        if version != str(SCHEMA_VERSION):
            raise CacheError(f"{path}: shard schema version {version}, expected {SCHEMA_VERSION}")
        return pf

    def read_row_group(self, pf: pq.ParquetFile, index: int) -> dict:
        try:
            table = pf.read_row_group(index)
        except Exception as e:
            raise CacheError(f"row group {index} unreadable ({e})") from None
        return decode_table(table, self.manifest)

    def iter_shard(self, shard: str):
        """Yield each row group of one shard as decoded tensors."""
        pf = self.open_shard(shard)
        for i in range(pf.num_row_groups):
            try:
                table = pf.read_row_group(i)
            except Exception as e:
                raise CacheError(f"{self.dir / shard}: row group {i} unreadable ({e})") from None
            yield decode_table(table, self.manifest)

    def empty_prompt(self) -> dict:
        """The empty prompt's encodings: t5 [L, D], clip [D], t5_len (for guidance dropout and CFG)."""
        from safetensors.torch import load_file
        path = self.dir / self.manifest.get("empty_prompt", EMPTY_PROMPT_NAME)
        if not path.is_file():
            raise CacheError(f"{path}: the empty-prompt encodings are missing")
        return load_file(path)
