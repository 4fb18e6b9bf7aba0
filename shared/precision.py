"""Dtype names, in one place: the spellings a command line takes (bf16, fp16, fp32 or the full
names), the canonical name a cache manifest records, and the torch dtype behind each."""
from __future__ import annotations

import torch

# Canonical name -> torch dtype. The cache stores exactly these (shared/cache/schema.py).
DTYPES = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}
# Every accepted spelling -> its canonical name.
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", **{name: name for name in DTYPES}}


def canonical_dtype(alias: str) -> str:
    """bf16/fp16/fp32 (or the full names) -> the canonical name ("bfloat16", "float16", "float32")."""
    try:
        return DTYPE_ALIASES[alias]
    except (KeyError, TypeError):
        raise ValueError(f"unknown dtype {alias!r}; use one of {', '.join(DTYPE_ALIASES)}") from None


def resolve_dtype(alias: str) -> torch.dtype:
    """bf16/fp16/fp32 (or the full names) -> the torch dtype; ValueError naming the choices otherwise."""
    return DTYPES[canonical_dtype(alias)]
