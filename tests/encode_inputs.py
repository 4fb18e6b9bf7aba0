"""Builders of good and bad encode inputs: tar shards and folders of captioned images."""
from __future__ import annotations

import io
import json
import os
import struct
import tarfile
import zlib
from pathlib import Path

from PIL import Image

COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40), (120, 40, 160), (240, 140, 20)]


def image_bytes(size=(48, 40), color=(200, 30, 30), fmt="JPEG", mode="RGB", **save) -> bytes:
    img = Image.new(mode, size, color if mode != "L" else color[0])
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def bomb_png(width=100_000, height=100_000) -> bytes:
    """A tiny PNG whose header claims a huge size (a decompression bomb)."""
    data = bytearray(image_bytes((8, 8), fmt="PNG"))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr:ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            add_member(tar, name, data)
    return path


def good_members(prefix: str, n: int, size=(48, 40)) -> list[tuple[str, bytes]]:
    out = []
    for i in range(n):
        key = f"{prefix}{i:04d}"
        out.append((f"{key}.jpg", image_bytes(size, COLORS[i % len(COLORS)])))
        out.append((f"{key}.txt", f"a picture number {i} of a red square".encode()))
    return out


LONG_CAPTION = " ".join(["a red circle on a blue background"] * 715)   # 5005 words

# What the bad-input shard holds, and the skip counts it must give.
BAD_EXPECTED_SKIPS = {"bad_image": 2, "empty_file": 2, "no_caption": 1, "no_image": 1,
                      "bad_caption_encoding": 1, "too_small": 1, "decompression_bomb": 1}


def bad_members() -> list[tuple[str, bytes]]:
    jpg = image_bytes((48, 40))
    return [
        ("good0000.jpg", jpg), ("good0000.txt", b"a red square"),
        ("trunc.jpg", jpg[: len(jpg) // 2]), ("trunc.txt", b"cut in half"),
        ("random.jpg", os.urandom(3000)), ("random.txt", b"random bytes"),
        ("empty.jpg", b""), ("empty.txt", b"an empty image file"),
        ("emptycap.jpg", jpg), ("emptycap.txt", b""),
        ("nocap.jpg", jpg),
        ("noimg.txt", b"a caption without an image"),
        ("latin1.jpg", jpg), ("latin1.txt", "caf\xe9 cr\xe8me".encode("latin-1")),
        ("tiny.jpg", image_bytes((8, 8))), ("tiny.txt", b"a tiny image"),
        ("bomb.png", bomb_png()), ("bomb.txt", b"a decompression bomb"),
        ("jsoncap.jpg", jpg), ("jsoncap.json", json.dumps({"caption": "caption from json"}).encode()),
        ("long.jpg", jpg), ("long.txt", LONG_CAPTION.encode()),
        ("good0001.png", image_bytes((40, 48), fmt="PNG", mode="RGBA", color=(0, 0, 255, 128))),
        ("good0001.txt", b"a translucent blue square"),
    ]


BAD_GOOD_KEYS = {"good0000", "jsoncap", "long", "good0001"}


def truncated_tar(path: Path, n_complete: int) -> Path:
    """A tar of good samples cut off in the middle of sample `n_complete`'s image."""
    members = good_members("cut", n_complete + 3)
    write_tar(path, members)
    with tarfile.open(path) as tar:
        target = tar.getmember(f"cut{n_complete:04d}.jpg")
        cut_at = target.offset_data + target.size // 2
    data = path.read_bytes()[:cut_at]
    path.write_bytes(data)
    return path
