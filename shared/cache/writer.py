"""CacheWriter: rows in, Parquet shards out, each shard renamed into place only when complete."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .files import TMP_SUFFIX, commit_file, sha256_file
from .schema import ARROW_SCHEMA, SCHEMA_VERSION, SHARD_SUFFIX, TENSOR_COLUMNS, tensor_to_bytes

# Tensor bytes barely compress (bf16 noise-like values) and compression costs read speed;
# the string columns compress well.
_COMPRESSION = {"key": "zstd", "caption": "zstd"}


@dataclass
class ShardInfo:
    path: str      # relative to the cache folder
    rows: int
    bytes: int
    sha256: str

    def to_dict(self) -> dict:
        return asdict(self)


class CacheWriter:
    """Writes rows into shards `{prefix}-{index:05d}.parquet` under `out_dir`.

    A shard holds at most `rows_per_shard` rows, in row groups of at most
    `row_group_rows` rows and about `row_group_bytes` bytes (a reader streams a row
    group at a time). A shard is written to a hidden temp file and renamed when closed,
    so readers never see a partial shard; `close()` returns the finished shards.
    """

    def __init__(self, out_dir, prefix: str, dtypes: dict[str, str], *, rows_per_shard: int = 1000,
                 row_group_rows: int = 256, row_group_bytes: int = 64 << 20, first_index: int = 0):
        if rows_per_shard < 1 or row_group_rows < 1:
            raise ValueError("rows_per_shard and row_group_rows must be positive")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.dtypes = dtypes
        self.rows_per_shard = rows_per_shard
        self.row_group_rows = row_group_rows
        self.row_group_bytes = row_group_bytes
        self.next_index = first_index
        self.shards: list[ShardInfo] = []
        self._pending: list[dict] = []
        self._pending_bytes = 0
        self._writer: pq.ParquetWriter | None = None
        self._tmp: Path | None = None
        self._final: Path | None = None
        self._shard_rows = 0

    # -- rows -----------------------------------------------------------------------------------
    def add(self, *, key: str, caption: str, latent: torch.Tensor, t5: torch.Tensor, t5_len: int,
            clip: torch.Tensor, width: int, height: int, latent_logvar: torch.Tensor | None = None) -> None:
        """Add one sample. `latent` is [C, h, w]; `t5` is [L, D] (only the rows to store)."""
        if latent.ndim != 3 or t5.ndim != 2 or clip.ndim != 1:
            raise ValueError(f"bad shapes for {key!r}: latent {tuple(latent.shape)}, t5 {tuple(t5.shape)}, "
                             f"clip {tuple(clip.shape)}")
        row = {
            "key": key, "caption": caption,
            "latent": tensor_to_bytes(latent, self.dtypes["latent"]),
            "latent_logvar": None if latent_logvar is None
            else tensor_to_bytes(latent_logvar, self.dtypes.get("latent_logvar", self.dtypes["latent"])),
            "latent_h": int(latent.shape[1]), "latent_w": int(latent.shape[2]),
            "t5": tensor_to_bytes(t5, self.dtypes["t5"]), "t5_len": int(t5_len),
            "clip": tensor_to_bytes(clip, self.dtypes["clip"]),
            "width": int(width), "height": int(height),
        }
        self._pending.append(row)
        self._pending_bytes += sum(len(row[c]) for c in TENSOR_COLUMNS if row[c] is not None)
        # Pending rows never exceed the open shard's room, so a flush always fits the shard.
        if (len(self._pending) >= self.row_group_rows or self._pending_bytes >= self.row_group_bytes
                or self._shard_rows + len(self._pending) >= self.rows_per_shard):
            self._flush_row_group()
        if self._shard_rows >= self.rows_per_shard:
            self._finish_shard()

    def _flush_row_group(self) -> None:
        if not self._pending:
            return
        if self._writer is None:
            self._open_shard()
        table = pa.Table.from_pylist(self._pending, schema=ARROW_SCHEMA)
        self._writer.write_table(table, row_group_size=len(self._pending))
        self._shard_rows += len(self._pending)
        self._pending, self._pending_bytes = [], 0

    # -- shards ---------------------------------------------------------------------------------
    def _open_shard(self) -> None:
        name = f"{self.prefix}-{self.next_index:05d}{SHARD_SUFFIX}"
        self._final = self.out_dir / name
        self._tmp = self.out_dir / f".{name}.{os.getpid()}{TMP_SUFFIX}"
        self._writer = pq.ParquetWriter(
            self._tmp, ARROW_SCHEMA.with_metadata({"flux_prep_schema_version": str(SCHEMA_VERSION)}),
            compression={c: _COMPRESSION.get(c, "none") for c in ARROW_SCHEMA.names},
            use_dictionary=["key", "caption"],
            write_statistics=["latent_h", "latent_w", "t5_len", "width", "height"],
        )
        self._shard_rows = 0

    def _finish_shard(self) -> None:
        self._flush_row_group()
        if self._writer is None:
            return
        self._writer.close()
        commit_file(self._tmp, self._final)
        self.shards.append(ShardInfo(path=self._final.name, rows=self._shard_rows,
                                     bytes=self._final.stat().st_size, sha256=sha256_file(self._final)))
        self._writer = self._tmp = self._final = None
        self._shard_rows = 0
        self.next_index += 1

    def close(self) -> list[ShardInfo]:
        """Write what is buffered, finish the open shard, and return every shard written."""
        if self._pending or self._writer is not None:
            self._finish_shard()
        return self.shards

    def abort(self) -> None:
        """Drop the open shard's temp file (after an error); finished shards stay."""
        if self._writer is not None:
            self._writer.close()
            self._tmp.unlink(missing_ok=True)
        self._writer = self._tmp = self._final = None
        self._pending, self._pending_bytes = [], 0

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
