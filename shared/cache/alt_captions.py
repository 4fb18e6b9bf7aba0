"""A row's other captions (docs/DESIGN.md, "Several captions per image"): list columns after the others.

Caption 0 keeps the columns every cache has (`caption` and the family's text columns), so a cache of one
caption per image is what it always was. A shard holding a row with several captions has, besides, one list
column per text column, named with ALT: `caption_alt` list<string>, `{states}_alt` list<binary> (each item
one caption's states, as `{states}` stores them), `{length}_alt` list<int16>, and `{pooled}_alt`
list<binary> where the family has a pooled vector (FLUX.1: `t5_alt`, `t5_len_alt`, `clip_alt`; FLUX.2:
`text_alt`, `text_len_alt`). Item j of each list is caption j + 1's; a row of one caption has empty lists.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

ALT = "_alt"
CAPTION_ALT = "caption" + ALT


def alt_name(column: str) -> str:
    return column + ALT


def alt_fields(text) -> list[pa.Field]:
    """The list columns of a family's TextSpec `text`, in the order they follow the others."""
    return [pa.field(CAPTION_ALT, pa.list_(pa.string()), nullable=False),
            pa.field(alt_name(text.states), pa.list_(pa.binary()), nullable=False),
            pa.field(alt_name(text.length), pa.list_(pa.int16()), nullable=False),
            *([pa.field(alt_name(text.pooled), pa.list_(pa.binary()), nullable=False)] if text.pooled else [])]


def alt_text_columns(text) -> set[str]:
    """The names of the text list columns a writer's add_batch takes (all but CAPTION_ALT)."""
    return {alt_name(c) for c in (text.states, text.length, text.pooled) if c}


def build_alt_columns(text, n: int, captions: list[list[str]] | None, alt: dict, dtypes: dict,
                      binary_column) -> tuple[dict, np.ndarray]:
    """The list columns of n rows ({name: array}) and each row's tensor bytes. `captions`: each row's other
    captions (None: none in any row); `alt`: the text list columns by name, each a list of n per-row lists
    (tensors [L, D] / [Dp], ints); `binary_column`: the writer's tensors-to-binary builder."""
    captions = captions if captions is not None else [[] for _ in range(n)]
    counts = np.array([len(c) for c in captions], dtype=np.int64)
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32), pa.int32())
    row_bytes = np.zeros(n, dtype=np.int64)
    columns = {CAPTION_ALT: pa.ListArray.from_arrays(offsets, pa.array([c for row in captions for c in row],
                                                                        pa.string()))}
    for c in (text.states, text.pooled):
        if c is None:
            continue
        flat = [t for row in alt.get(alt_name(c), [[]] * n) for t in row]
        if len(flat) != counts.sum():
            raise ValueError(f"add_batch: {alt_name(c)} holds {len(flat)} tensors for {counts.sum()} captions")
        values, nbytes = binary_column(flat, dtypes[c]) if flat else (pa.array([], pa.binary()), np.zeros(0))
        columns[alt_name(c)] = pa.ListArray.from_arrays(offsets, values)
        cum = np.concatenate([[0], np.cumsum(nbytes)]).astype(np.int64)
        ends = offsets.to_numpy()
        row_bytes += cum[ends[1:]] - cum[ends[:-1]]
    lengths = [int(x) for row in alt.get(alt_name(text.length), [[]] * n) for x in row]
    columns[alt_name(text.length)] = pa.ListArray.from_arrays(offsets, pa.array(lengths, pa.int16()))
    return columns, row_bytes


def decode_alt(table: pa.Table, text, states_shape, decode_binary_column, dtypes: dict, pooled_dim: int | None) -> dict:
    """A row group's list columns -> {CAPTION_ALT: per-row lists of str, each text list column: per-row
    lists of tensors (or ints, the lengths)}. `states_shape(length)`: one caption's states shape."""
    captions = table.column(CAPTION_ALT).to_pylist()
    bounds = np.concatenate([[0], np.cumsum([len(c) for c in captions])])
    lengths = _flat(table, alt_name(text.length)).to_numpy(zero_copy_only=False).astype(np.int64)
    out = {CAPTION_ALT: captions,
           alt_name(text.length): [lengths[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:])]}
    columns = [(text.states, [states_shape(int(x)) for x in lengths])]
    if text.pooled:
        columns.append((text.pooled, [(pooled_dim,)] * len(lengths)))
    for c, shapes in columns:
        values = decode_binary_column(_flat(table, alt_name(c)), dtypes[c], shapes) if len(lengths) else []
        out[alt_name(c)] = [[values[j] for j in range(a, b)] for a, b in zip(bounds[:-1], bounds[1:])]
    return out


def _flat(table: pa.Table, name: str) -> pa.Array:
    """A list column's items, in row order, as one array."""
    col = table.column(name)
    col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    return col.flatten()
