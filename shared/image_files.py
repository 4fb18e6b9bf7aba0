"""Image files of flux-sample and of the trainer's samples: one PNG per (prompt, seed) with its settings
in text chunks, an optional grid, an index.

Every file appears only when complete (shared's atomic writer: a temporary name in the same folder,
then a rename), so an interrupted run never leaves a truncated image behind.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from shared.cache.files import atomic_write

INDEX_NAME = "samples.json"
GRID_NAME = "grid.png"


def slug(prompt: str, limit: int = 48) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    return s[:limit].rstrip("-") or "prompt"


def image_name(prompt_index: int, prompt: str, seed: int) -> str:
    return f"{prompt_index:04d}-{slug(prompt)}-seed{seed}.png"


def save_png(image: np.ndarray | Image.Image, path: Path, metadata: dict) -> None:
    """An RGB PNG with each metadata item as a text chunk (strings as-is, other values as JSON)."""
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    info = PngInfo()
    for k, v in metadata.items():
        info.add_text(k, v if isinstance(v, str) else json.dumps(v))
    atomic_write(Path(path), lambda fh: img.save(fh, format="PNG", pnginfo=info))


def read_png_text(path: Path) -> dict:
    with Image.open(path) as img:
        return dict(img.text)


def make_grid(images: list[np.ndarray], columns: int) -> Image.Image:
    """Images of one size in rows of `columns` (one row per prompt, one column per seed)."""
    h, w = images[0].shape[:2]
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(Image.fromarray(im), ((i % columns) * w, (i // columns) * h))
    return grid


def write_index(out_dir: Path, entries: list[dict]) -> None:
    data = json.dumps({"samples": entries}, indent=2).encode()
    atomic_write(Path(out_dir) / INDEX_NAME, lambda fh: fh.write(data))
