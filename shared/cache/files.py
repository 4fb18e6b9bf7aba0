"""Atomic file writes and checksums: nothing half-written is ever visible under its final name."""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

TMP_SUFFIX = ".tmp"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_file(tmp: Path, final: Path) -> None:
    """fsync `tmp`, rename it over `final`, fsync the folder: after this returns the file survives a crash."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    fsync_dir(final.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")
    tmp.write_bytes(data)
    commit_file(tmp, path)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


class HashingFile(io.RawIOBase):
    """A file opened for writing that hashes what passes through it, so that a shard's sha256
    needs no second read of the file (2 GB per 1000 rows at padded-256)."""

    def __init__(self, path: Path):
        super().__init__()
        self._f = open(path, "wb")
        self._hash = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self._hash.update(data)
        n = self._f.write(data)
        self.size += n
        return n

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        if not self._f.closed:
            self._f.flush()

    def close(self) -> None:
        super().close()   # flushes first
        self._f.close()

    def sha256(self) -> str:
        return self._hash.hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
