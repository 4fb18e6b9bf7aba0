"""Reference images' columns (edit training, issue 27): a cache whose manifest says `"references": N` holds, for
i in 0..N-1, `ref{i}_latent` (the VAE posterior mean of reference i, raw, in the `latent` column's dtype and
layout), `ref{i}_h`, `ref{i}_w` (int16, that latent's size) and `ref{i}_width`, `ref{i}_height` (int32, the
reference image's own pixels, after EXIF orientation, as `width`/`height` are the target's). Every row holds
exactly N. A manifest without the key (or 0) is a plain cache, with none of these columns."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

REFERENCES_KEY = "references"


def reference_count(manifest: dict) -> int:
    """How many reference images each row of a cache holds (0: a plain cache)."""
    return int(manifest.get(REFERENCES_KEY) or 0)


def latent_column(i: int) -> str:
    return f"ref{i}_latent"


def columns(i: int) -> dict[str, str]:
    """Reference i's column names by role: latent, h, w, width, height."""
    return {"latent": latent_column(i), "h": f"ref{i}_h", "w": f"ref{i}_w", "width": f"ref{i}_width",
            "height": f"ref{i}_height"}


def arrow_fields(count: int) -> list[pa.Field]:
    """The columns of `count` references, after the plain cache's."""
    out = []
    for i in range(count):
        c = columns(i)
        out += [pa.field(c["latent"], pa.binary(), nullable=False), pa.field(c["h"], pa.int16(), nullable=False),
                pa.field(c["w"], pa.int16(), nullable=False), pa.field(c["width"], pa.int32(), nullable=False),
                pa.field(c["height"], pa.int32(), nullable=False)]
    return out


def size_arrays(i: int, latents, widths, heights) -> dict[str, pa.Array]:
    """Reference i's integer columns of a batch: its latents' h and w, its images' pixels."""
    c = columns(i)
    shapes = [tuple(x.shape) for x in latents]
    return {c["h"]: pa.array([s[1] for s in shapes], pa.int16()), c["w"]: pa.array([s[2] for s in shapes], pa.int16()),
            c["width"]: pa.array([int(x) for x in widths], pa.int32()),
            c["height"]: pa.array([int(x) for x in heights], pa.int32())}


def decode_references(table: pa.Table, manifest: dict, decode_binary_column) -> dict:
    """A row group's reference columns -> {ref{i}_latent: [N, C, h, w] or a list of [C, h, w]; ref{i}_h, _w,
    _width, _height: int64 tensors}; {} for a plain cache."""
    out = {}
    channels, dtype = manifest["dims"]["latent_channels"], manifest["dtypes"]["latent"]
    for i in range(reference_count(manifest)):
        c = columns(i)
        ints = {role: table.column(c[role]).to_numpy().astype(np.int64) for role in ("h", "w", "width", "height")}
        shapes = [(channels, int(h), int(w)) for h, w in zip(ints["h"], ints["w"])]
        out[c["latent"]] = decode_binary_column(table.column(c["latent"]), dtype, shapes)
        out.update({c[role]: torch.from_numpy(v) for role, v in ints.items()})
    return out
