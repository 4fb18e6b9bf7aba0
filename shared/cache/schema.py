"""The cache contract, version 1 (docs/DESIGN.md): one row per sample, tensors as raw
little-endian bytes in binary columns, shapes in integer columns, dtypes in the manifest; the text
columns are the model family's (shared/family/)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from ..precision import DTYPES

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
EMPTY_PROMPT_NAME = "empty_prompt.safetensors"
SHARD_SUFFIX = ".parquet"


def arrow_schema(text, mask: bool = False, references: int = 0, alt: bool = False) -> pa.Schema:
    """The shards' columns for a family's text columns (`text`: its TextSpec). FLUX.1's: key, caption,
    latent, latent_logvar, latent_h, latent_w, t5, t5_len, clip, width, height; then the loss mask
    [latent_h, latent_w] of a cache encoded with masks (`mask`: dtypes has "mask"); then `references`
    reference images' columns (references.py); then, `alt`: in a shard holding rows of several captions,
    their list columns (alt_captions.py)."""
    from .alt_captions import alt_fields
    from .references import arrow_fields
    return pa.schema([
        pa.field("key", pa.string(), nullable=False),
        pa.field("caption", pa.string(), nullable=False),
        pa.field("latent", pa.binary(), nullable=False),
        pa.field("latent_logvar", pa.binary(), nullable=True),
        pa.field("latent_h", pa.int16(), nullable=False),
        pa.field("latent_w", pa.int16(), nullable=False),
        pa.field(text.states, pa.binary(), nullable=False),
        pa.field(text.length, pa.int16(), nullable=False),
        *([pa.field(text.pooled, pa.binary(), nullable=False)] if text.pooled else []),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        *([pa.field("mask", pa.binary(), nullable=False)] if mask else []),
        *arrow_fields(references),
        *(alt_fields(text) if alt else []),
    ])


# Storage dtypes a cache may use, by name (part of the contract: named here, mapped in shared/precision.py).
# bf16 has no numpy type: it travels as int16 bits.
_TORCH_DTYPES = {name: DTYPES[name] for name in ("bfloat16", "float16", "float32")}
_BITS_DTYPES = {torch.bfloat16: torch.int16}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _TORCH_DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported cache dtype {name!r}; use one of {', '.join(_TORCH_DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    for name, dt in _TORCH_DTYPES.items():
        if dt == dtype:
            return name
    raise ValueError(f"unsupported cache dtype {dtype}; use one of {', '.join(_TORCH_DTYPES)}")


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype whose bytes are read for a storage dtype (bf16 -> little-endian int16 bits)."""
    dt = torch_dtype(name)
    bits = _BITS_DTYPES.get(dt, dt)
    return np.dtype({torch.int16: "<i2", torch.float16: "<f2", torch.float32: "<f4"}[bits])


def array_to_tensor(arr: np.ndarray, dtype_name_: str) -> torch.Tensor:
    """Raw numpy bits -> torch tensor of the storage dtype, copying exactly once."""
    t = torch.from_numpy(arr.astype(arr.dtype.newbyteorder("="), copy=True))
    dt = torch_dtype(dtype_name_)
    return t.view(dt) if dt in _BITS_DTYPES else t
