"""Reference images in the cache (edit training, issue 27): the manifest's `references` N and, for each
reference i < N, the columns `ref{i}_latent` (the VAE posterior mean, raw, as `latent`), `ref{i}_h`,
`ref{i}_w` (its latent size), `ref{i}_width`, `ref{i}_height` (pixels). Every row holds exactly N."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch


def reference_count(manifest: dict) -> int:
    """How many reference images each sample of a cache holds (0: a plain cache)."""
    return int(manifest.get("references") or 0)


def reference_fields(count: int) -> list[pa.Field]:
    """The shards' reference columns, for CacheWriter(extra_fields=...)."""
    out = []
    for i in range(count):
        out += [pa.field(f"ref{i}_latent", pa.binary(), nullable=False),
                pa.field(f"ref{i}_h", pa.int16(), nullable=False), pa.field(f"ref{i}_w", pa.int16(), nullable=False),
                pa.field(f"ref{i}_width", pa.int32(), nullable=False),
                pa.field(f"ref{i}_height", pa.int32(), nullable=False)]
    return out


def reference_arrays(refs: list[list[torch.Tensor]], sizes: list[list[tuple[int, int]]], dtype: str) -> dict:
    """CacheWriter.add_batch's `extra` for B rows: refs[i][b] reference i of row b ([C, h, w]), sizes[i][b] its
    (width, height) in pixels; stored in `dtype` as the latents are."""
    from .writer import _binary_column
    out = {}
    for i, (latents, px) in enumerate(zip(refs, sizes)):
        out[f"ref{i}_latent"] = _binary_column(list(latents), dtype)[0]
        out[f"ref{i}_h"] = pa.array([int(x.shape[1]) for x in latents], pa.int16())
        out[f"ref{i}_w"] = pa.array([int(x.shape[2]) for x in latents], pa.int16())
        out[f"ref{i}_width"] = pa.array([int(w) for w, _ in px], pa.int32())
        out[f"ref{i}_height"] = pa.array([int(h) for _, h in px], pa.int32())
    return out


def decode_references(table: pa.Table, manifest: dict) -> dict:
    """The reference columns of a row group: `ref{i}_latent` ([N, C, h, w] or a list of [C, h, w]) and
    `ref{i}_h`, `ref{i}_w` (int64 tensors), for i < the manifest's references."""
    from .reader import decode_binary_column
    out = {}
    channels, dtype = manifest["dims"]["latent_channels"], manifest["dtypes"]["latent"]
    for i in range(reference_count(manifest)):
        hs = table.column(f"ref{i}_h").to_numpy().astype(np.int64)
        ws = table.column(f"ref{i}_w").to_numpy().astype(np.int64)
        shapes = [(channels, int(h), int(w)) for h, w in zip(hs, ws)]
        out[f"ref{i}_latent"] = decode_binary_column(table.column(f"ref{i}_latent"), dtype, shapes)
        out[f"ref{i}_h"], out[f"ref{i}_w"] = torch.from_numpy(hs), torch.from_numpy(ws)
    return out
