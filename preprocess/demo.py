"""Demo data: captioned images a tiny model can learn, as webdataset tar shards in CC12M's layout.

Every caption follows `a {color} {shape} on a {background} background`; the shape's
size, position and colour shade vary. Same seed, same bytes.
"""
from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

from PIL import Image, ImageDraw

from shared.cache.files import atomic_write
from shared.demo_grammar import BACKGROUNDS, COLORS, SHAPES, caption_for


def draw_scene(rng: random.Random, size: int, color: str, shape: str, background: str) -> Image.Image:
    img = Image.new("RGB", (size, size), BACKGROUNDS[background])
    draw = ImageDraw.Draw(img)
    side = rng.uniform(0.35, 0.7) * size
    cx = rng.uniform(side / 2, size - side / 2)
    cy = rng.uniform(side / 2, size - side / 2)
    fill = tuple(max(0, min(255, c + rng.randint(-15, 15))) for c in COLORS[color])
    box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)
    return img


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_demo_shards(out_dir, num_samples: int = 256, size: int = 64, samples_per_shard: int = 128,
                      seed: int = 0) -> list[Path]:
    """Write `demo-NNNNN.tar` shards of KEY.jpg, KEY.txt, KEY.json; returns their paths."""
    if num_samples < 1 or size < 16 or samples_per_shard < 1:
        raise ValueError("num_samples and samples_per_shard must be positive and size at least 16")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for shard in range((num_samples + samples_per_shard - 1) // samples_per_shard):
        path = out / f"demo-{shard:05d}.tar"
        samples = range(shard * samples_per_shard, min(num_samples, (shard + 1) * samples_per_shard))
        atomic_write(path, lambda f: _write_tar(f, rng, size, samples))
        paths.append(path)
    return paths


def _write_tar(file, rng: random.Random, size: int, samples: range) -> None:
    """One shard's samples, drawn from `rng` in order, as a tar into `file`."""
    with tarfile.open(fileobj=file, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i in samples:
            color, shape = rng.choice(sorted(COLORS)), rng.choice(SHAPES)
            background = rng.choice(sorted(BACKGROUNDS))
            img = draw_scene(rng, size, color, shape, background)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=95)
            key, caption = f"{i:09d}", caption_for(color, shape, background)
            meta = {"key": key, "caption": caption, "width": size, "height": size,
                    "color": color, "shape": shape, "background": background}
            _add(tar, f"{key}.jpg", buf.getvalue())
            _add(tar, f"{key}.txt", caption.encode())
            _add(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
