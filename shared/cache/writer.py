"""CacheWriter: rows in, Parquet shards out, each shard in place only when complete (store.py)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from . import references
from .alt_captions import alt_text_columns, build_alt_columns
from .schema import _BITS_DTYPES, SCHEMA_VERSION, SHARD_SUFFIX, arrow_schema, torch_dtype
from .store import open_store

# Tensor bytes barely compress (bf16 noise-like values) and compression costs read speed;
# the string columns compress well.
_COMPRESSION = {"key": "zstd", "caption": "zstd", "caption_alt": "zstd"}


@dataclass
class ShardInfo:
    path: str      # relative to the cache folder
    rows: int
    bytes: int
    sha256: str

    def to_dict(self) -> dict:
        return asdict(self)


class CacheWriter:
    """Writes rows into shards `{prefix}-{index:05d}.parquet` under `out_dir`, with the text columns of
    `text` (a family's TextSpec: shared/family/).

    A shard holds at most `rows_per_shard` rows, in row groups of at most
    `row_group_rows` rows and about `row_group_bytes` bytes (a reader streams a row
    group at a time). `out_dir` is a folder, a URL or a Store: a local shard is written to a
    hidden temp file and renamed when closed, a remote one uploaded whole, so readers never see a
    partial shard; `close()` returns the finished shards.
    """

    def __init__(self, out_dir, prefix: str, dtypes: dict[str, str], *, text, rows_per_shard: int = 1000,
                 row_group_rows: int = 256, row_group_bytes: int = 64 << 20, references: int = 0):
        if rows_per_shard < 1 or row_group_rows < 1:
            raise ValueError("rows_per_shard and row_group_rows must be positive")
        self.text = text
        self.references = references     # reference images per row (references.py); 0: a plain cache
        self.alt = False             # whether the shards now written have the other captions' list columns
        self.schema = arrow_schema(text, mask="mask" in dtypes, references=references)
        self.store = open_store(out_dir)
        self.store.makedirs()
        self.prefix = prefix
        self.dtypes = dtypes
        self.rows_per_shard = rows_per_shard
        self.row_group_rows = row_group_rows
        self.row_group_bytes = row_group_bytes
        self.next_index = 0
        self.shards: list[ShardInfo] = []
        self._pending: list[pa.RecordBatch] = []   # slices of added batches, not yet written
        self._pending_rows = 0
        self._pending_bytes = 0
        self._writer: pq.ParquetWriter | None = None
        self._sink = None        # the open shard's LocalSink or RemoteSink
        self._name: str | None = None
        self._shard_rows = 0

    # -- rows -----------------------------------------------------------------------------------
    def add(self, *, key: str, caption: str, latent: torch.Tensor, width: int, height: int,
            latent_logvar: torch.Tensor | None = None, refs: list[dict] | None = None, **text) -> None:
        """Add one sample. `latent` is [C, h, w]; `text` the family's text columns: states [L, D] (only the
        rows to store), their length, a pooled vector [Dp] (FLUX.1: t5=, t5_len=, clip=); `refs`: each
        reference's {"latent": [C, h, w], "width": pixels, "height": pixels}."""
        self.add_batch(keys=[key], captions=[caption], latent=[latent], widths=[width], heights=[height],
                       latent_logvar=None if latent_logvar is None else [latent_logvar],
                       refs=None if refs is None else [{k: [v] for k, v in r.items()} for r in refs],
                       **{name: [value] for name, value in text.items()})

    def add_batch(self, *, keys: list[str], captions: list[str], latent, widths, heights, latent_logvar=None,
                  copy: bool = True, mask=None, refs: list[dict] | None = None,
                  alt_captions: list[list[str]] | None = None, **text) -> None:
        """Add B samples at once: the same rows, row groups and shards as B `add` calls, at a
        fraction of the cost (each tensor column is copied once, into one buffer, per batch).

        Tensor arguments are a batch tensor ([B, C, h, w], [B, L, D], [B, D]) or a list of B
        per-row tensors ([C, h, w], [L_i, D], [D]); the text length, `widths`, `heights` are B ints.
        `text`: the family's text columns by name; `mask` ([B, h, w] or B [h, w]) exactly when the cache has
        masks (dtypes has "mask"). `copy=False`: CPU batch tensors already in the storage
        dtype are referenced, not copied, until their row group is written; the caller must not change them
        (the encoder hands over fresh host copies, 2 MB a row at padded-256: the copy was a fifth of the
        writer's time).

        `alt_captions`: each row's other captions, and in `text` their columns (`t5_alt`, `t5_len_alt`,
        `clip_alt`: B per-row lists); the first row with one ends the open shard, and the shards after it
        have the list columns (alt_captions.py), so a cache without one is as before. `refs`: one {"latent",
        "width", "height"} per reference image of the cache, each a batch tensor or B tensors and B ints, as
        `latent`, `widths`, `heights`."""
        spec, n = self.text, len(keys)
        alt = {k: text.pop(k) for k in alt_text_columns(spec) if k in text}
        self._check_inputs(text, mask, refs)
        if n == 0:
            return
        states = text[spec.states]
        if n > 1 and n * states[0].numel() * torch_dtype(self.dtypes[spec.states]).itemsize >= 1 << 30:
            h = n // 2     # Arrow's binary offsets are 32-bit: keep each column well under 2 GiB
            for part in (slice(0, h), slice(h, n)):
                self.add_batch(keys=keys[part], captions=captions[part], latent=latent[part], widths=widths[part],
                               heights=heights[part], copy=copy,
                               latent_logvar=None if latent_logvar is None else latent_logvar[part],
                               mask=None if mask is None else mask[part],
                               refs=None if refs is None else [{k: v[part] for k, v in r.items()} for r in refs],
                               alt_captions=None if alt_captions is None else alt_captions[part],
                               **{name: value[part] for name, value in {**text, **alt}.items()})
            return
        if not all(len(c) == n for c in (captions, latent, widths, heights, *text.values(),
                                         *(v for r in refs or () for v in r.values()))) \
                or (latent_logvar is not None and len(latent_logvar) != n):
            raise ValueError(f"add_batch: columns of unequal length for {n} keys")
        columns, row_bytes = self._tensor_columns(keys[0], latent, latent_logvar, text, mask, refs, copy)
        columns.update({
            "key": pa.array(keys, pa.string()), "caption": pa.array(captions, pa.string()),
            spec.length: pa.array([int(x) for x in text[spec.length]], pa.int16()),
            "width": pa.array([int(x) for x in widths], pa.int32()),
            "height": pa.array([int(x) for x in heights], pa.int32())})
        if alt_captions is not None and any(alt_captions) and not self.alt:
            self._finish_shard()
            self.alt, self.schema = True, arrow_schema(spec, mask="mask" in self.dtypes, references=self.references,
                                                       alt=True)
        if self.alt:
            alt_columns, alt_bytes = build_alt_columns(spec, n, alt_captions, alt, self.dtypes,
                                                       lambda ts, dt: _binary_column(ts, dt, copy))
            columns.update(alt_columns)
            row_bytes += alt_bytes
        batch = pa.RecordBatch.from_arrays([columns[name] for name in self.schema.names], schema=self.schema)
        self._add_record_batch(batch, np.cumsum(row_bytes))

    def _check_inputs(self, text: dict, mask, refs) -> None:
        """The batch brings what this cache's rows hold: the family's text columns, a mask exactly when the
        cache has masks, its number of reference images."""
        spec = self.text
        if len(refs or ()) != self.references:
            raise ValueError(f"add_batch: {len(refs or ())} reference images given, the cache's rows hold "
                             f"{self.references}")
        expected = {spec.states, spec.length} | ({spec.pooled} if spec.pooled else set())
        if set(text) != expected:
            raise ValueError(f"add_batch: text columns {sorted(text)}, the cache's are {sorted(expected)}")
        if (mask is None) == ("mask" in self.dtypes):
            raise ValueError("add_batch: a cache with masks needs a mask per row, one without takes none")

    def _tensor_columns(self, first_key: str, latent, latent_logvar, text: dict, mask, refs, copy: bool):
        """The batch's tensor columns (and the latents' shapes) as Arrow arrays, and each row's tensor bytes."""
        spec, n = self.text, len(latent)
        lat_shapes = [tuple(x.shape) for x in latent]
        if any(len(sh) != 3 for sh in lat_shapes) or any(x.ndim != 2 for x in text[spec.states]) \
                or (spec.pooled and any(x.ndim != 1 for x in text[spec.pooled])):
            raise ValueError(f"bad shapes in batch starting {first_key!r}: latent {lat_shapes[0]}, "
                             + ", ".join(f"{c} {tuple(text[c][0].shape)}" for c in spec.tensor_columns))
        lat_dtype = self.dtypes["latent"]
        columns = {"latent_h": pa.array([sh[1] for sh in lat_shapes], pa.int16()),
                   "latent_w": pa.array([sh[2] for sh in lat_shapes], pa.int16())}
        row_bytes = np.zeros(n, dtype=np.int64)
        for c, values in (("latent", latent), *((c, text[c]) for c in spec.tensor_columns),
                          ("latent_logvar", latent_logvar)):
            if values is None:
                columns[c] = pa.nulls(n, pa.binary())
            else:
                columns[c], nbytes = _binary_column(values, self.dtypes.get(c, lat_dtype), copy)
                row_bytes += nbytes
        if mask is not None:
            if [tuple(m.shape) for m in mask] != [sh[1:] for sh in lat_shapes]:
                raise ValueError(f"masks in batch starting {first_key!r} are not their latents' height x width")
            columns["mask"], nbytes = _binary_column(mask, self.dtypes["mask"], copy)
            row_bytes += nbytes
        for i, ref in enumerate(refs or ()):    # the latent's dtype and layout (references.py)
            if any(x.ndim != 3 for x in ref["latent"]):
                raise ValueError(f"bad reference {i} latent shape in batch starting {first_key!r}")
            columns[references.latent_column(i)], nbytes = _binary_column(ref["latent"], lat_dtype, copy)
            row_bytes += nbytes
            columns.update(references.size_arrays(i, ref["latent"], ref["width"], ref["height"]))
        return columns, row_bytes

    def _add_record_batch(self, batch: pa.RecordBatch, cum_bytes: np.ndarray) -> None:
        """Split `batch` exactly where row-by-row adding would flush a row group or finish a shard."""
        start = 0
        while start < batch.num_rows:
            rest = batch.num_rows - start
            # Rows k = 1..rest of the rest; the first k at which row-by-row adding would flush.
            k = np.arange(1, rest + 1)
            before = cum_bytes[start - 1] if start else 0
            added = cum_bytes[start:] - before
            full = (self._pending_rows + k >= self.row_group_rows) \
                | (self._pending_bytes + added >= self.row_group_bytes) \
                | (self._shard_rows + self._pending_rows + k >= self.rows_per_shard)
            hit = np.flatnonzero(full)
            take = int(hit[0]) + 1 if len(hit) else rest
            self._pending.append(batch.slice(start, take))
            self._pending_rows += take
            self._pending_bytes += int(added[take - 1])
            start += take
            if len(hit):
                self._flush_row_group()
                if self._shard_rows >= self.rows_per_shard:
                    self._finish_shard()

    def _flush_row_group(self) -> None:
        if not self._pending:
            return
        if self._writer is None:
            self._open_shard()
        table = pa.Table.from_batches(self._pending, schema=self.schema)
        self._writer.write_table(table, row_group_size=table.num_rows)
        self._shard_rows += table.num_rows
        self._pending, self._pending_rows, self._pending_bytes = [], 0, 0

    # -- shards ---------------------------------------------------------------------------------
    def _open_shard(self) -> None:
        self._name = f"{self.prefix}-{self.next_index:05d}{SHARD_SUFFIX}"
        self._sink = self.store.create(self._name)
        self._writer = pq.ParquetWriter(
            self._sink.file, self.schema.with_metadata({"flux_prep_schema_version": str(SCHEMA_VERSION)}),
            compression={c: _COMPRESSION.get(c, "none") for c in self.schema.names},
            use_dictionary=["key", "caption"],
            write_statistics=["latent_h", "latent_w", self.text.length, "width", "height"],
            # A CRC per page: CacheReader checks them as it reads, so a flipped byte stops a reader
            # at its row group without a full sha256 pass over the cache first.
            write_page_checksum=True,
        )
        self._shard_rows = 0

    def _finish_shard(self) -> None:
        self._flush_row_group()
        if self._writer is None:
            return
        self._writer.close()
        size = self._sink.commit()
        self.shards.append(ShardInfo(path=self._name, rows=self._shard_rows, bytes=size,
                                     sha256=self._sink.file.sha256()))
        self._writer = self._sink = self._name = None
        self._shard_rows = 0
        self.next_index += 1

    def close(self) -> list[ShardInfo]:
        """Write what is buffered, finish the open shard, and return every shard written."""
        if self._pending or self._writer is not None:
            self._finish_shard()
        return self.shards

    def abort(self) -> None:
        """Drop the open shard's temp file or upload (after an error); finished shards stay."""
        if self._writer is not None:
            self._writer.close()
            self._sink.abort()
        self._writer = self._sink = self._name = None
        self._pending, self._pending_rows, self._pending_bytes = [], 0, 0

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _binary_column(tensors, dtype_name_: str, copy: bool = True) -> tuple[pa.BinaryArray, np.ndarray]:
    """A batch tensor [B, ...] or B tensors -> a binary array of each row's raw little-endian
    storage-dtype bytes, in one buffer that the array owns (one copy);
    and each row's byte count."""
    dt = torch_dtype(dtype_name_)
    if isinstance(tensors, torch.Tensor):
        rows = tensors.detach().reshape(len(tensors), -1)
        if rows.device.type != "cpu" or rows.dtype != dt:
            flat = rows.to("cpu", dt).reshape(-1)          # the conversion is the one copy
        else:
            flat = rows.reshape(-1)
            if copy or not flat.is_contiguous():
                flat = flat.clone()                        # never alias the caller's memory
        sizes = np.full(len(tensors), rows.shape[1], dtype=np.int64)
    else:
        parts = [t.detach().to("cpu", dt).reshape(-1) for t in tensors]
        flat = torch.cat(parts) if parts else torch.empty(0, dtype=dt)
        sizes = np.array([p.numel() for p in parts], dtype=np.int64)
    bits = _BITS_DTYPES.get(dt)
    arr = (flat.view(bits) if bits is not None else flat).numpy()
    arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)     # free on little-endian hosts
    offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes * arr.itemsize, out=offsets[1:])
    if offsets[-1] >= 2 ** 31:
        raise ValueError("a batch's tensor column exceeds 2 GiB; add it in smaller batches")
    array = pa.Array.from_buffers(pa.binary(), len(sizes),
                                  [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(arr)])
    return array, sizes * arr.itemsize
