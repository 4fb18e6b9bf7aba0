"""Atomic file writes and checksums: nothing half-written is ever visible under its final name."""
from __future__ import annotations

import ctypes
import hashlib
import io
import json
import os
import sys
from pathlib import Path
from typing import BinaryIO, Callable

TMP_SUFFIX = ".tmp"
# HashingFile asks the kernel to start writing a file's pages to disk every WRITEBACK_BYTES, without
# waiting, so the fsync at a shard's end finds little left to write (0: no early write-back). Left
# to that fsync, shards that close together write GBs in one burst while the GPU waits
# (docs/BENCHMARKS.md, run F, has the figures).
WRITEBACK_BYTES = 64 << 20
_SYNC_FILE_RANGE_WRITE = 2   # linux/fs.h: start write-out of the range's dirty pages, do not wait


def _sync_file_range():
    """libc's sync_file_range (Linux), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


SYNC_FILE_RANGE = _sync_file_range()


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


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """The one atomic writer: `write(file)` fills a temp file beside `path` (`.NAME.PID.tmp`, in a
    folder made if missing), which is then committed (commit_file). An error removes the temp file,
    and `path` keeps what it held before."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")
    try:
        with open(tmp, "wb") as f:
            write(f)
        commit_file(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


class HashingFile(io.RawIOBase):
    """A file opened for writing that hashes what passes through it, so that a shard's sha256
    needs no second read of the file (2 GB per 1000 rows at padded-256)."""

    def __init__(self, path: Path | None, writeback_bytes: int | None = None, *, raw=None):
        """`writeback_bytes`: start write-back every so many bytes (None: WRITEBACK_BYTES; 0: never).
        `raw`: an open binary file to write to instead of `path` (an object store's upload; no
        write-back hints)."""
        super().__init__()
        self._f = open(path, "wb") if raw is None else raw
        self._hash = hashlib.sha256()
        self.size = 0
        self._writeback = 0 if raw is not None else WRITEBACK_BYTES if writeback_bytes is None else writeback_bytes
        self._written_back = 0   # bytes whose write-back has been started
        self.writebacks = 0      # calls that started one

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self._hash.update(data)
        n = self._f.write(data)
        self.size += n
        if self._writeback and SYNC_FILE_RANGE is not None and self.size - self._written_back >= self._writeback:
            self._start_writeback()
        return n

    def _start_writeback(self) -> None:
        # Only a hint: durability still comes from the fsync in commit_file. A file system that
        # refuses it (EINVAL, ESPIPE) just gets no more hints.
        self._f.flush()
        if SYNC_FILE_RANGE(self._f.fileno(), self._written_back, self.size - self._written_back,
                           _SYNC_FILE_RANGE_WRITE) != 0:
            self._writeback = 0
            return
        self._written_back = self.size
        self.writebacks += 1

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
