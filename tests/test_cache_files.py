"""shared/cache/files.py: a shard's file starts its write-back early and is still written exactly."""
import hashlib
import os

import pytest
import torch

import shared.cache.files as files
from shared.cache import CacheWriter
from shared.family.flux1 import FLUX1
from shared.cache.files import HashingFile

CHUNK = os.urandom(3000)


def _write(path, chunks: int, writeback_bytes: int) -> HashingFile:
    f = HashingFile(path, writeback_bytes=writeback_bytes)
    for _ in range(chunks):
        assert f.write(CHUNK) == len(CHUNK)
    f.close()
    return f


@pytest.mark.skipif(files.SYNC_FILE_RANGE is None, reason="no sync_file_range here (Linux only)")
def test_write_back_starts_every_n_bytes_and_the_file_is_exact(tmp_path):
    f = _write(tmp_path / "a", 10, writeback_bytes=8192)
    assert f.writebacks == 3                      # at 9000, 18000 and 27000 bytes; 3000 left for the fsync
    data = CHUNK * 10
    assert (tmp_path / "a").read_bytes() == data
    assert f.sha256() == hashlib.sha256(data).hexdigest() and f.size == len(data)


def test_no_write_back_when_off(tmp_path):
    f = _write(tmp_path / "a", 10, writeback_bytes=0)
    assert f.writebacks == 0 and (tmp_path / "a").read_bytes() == CHUNK * 10


def test_a_refused_write_back_is_not_asked_again(tmp_path, monkeypatch):
    calls = []

    def refuse(fd, offset, nbytes, flags):
        calls.append((offset, nbytes, flags))
        return -1
    monkeypatch.setattr(files, "SYNC_FILE_RANGE", refuse)
    f = _write(tmp_path / "a", 10, writeback_bytes=4096)
    assert calls == [(0, 6000, 2)] and f.writebacks == 0   # asked once, at 6000 bytes, then never
    assert (tmp_path / "a").read_bytes() == CHUNK * 10


def test_shards_are_the_same_bytes_with_and_without_write_back(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    rows = [dict(key=f"k{i}", caption=f"caption {i}", latent=torch.randn(16, 4, 4, generator=g),
                 t5=torch.randn(8, 32, generator=g), t5_len=8, clip=torch.randn(12, generator=g), width=32, height=32)
            for i in range(10)]
    started = []
    real = files.SYNC_FILE_RANGE or (lambda fd, offset, nbytes, flags: 0)
    monkeypatch.setattr(files, "SYNC_FILE_RANGE", lambda *args: started.append(args) or real(*args))
    shas = {}
    for writeback in (0, 1024):
        monkeypatch.setattr(files, "WRITEBACK_BYTES", writeback)
        dtypes = {"latent": "bfloat16", "t5": "bfloat16", "clip": "bfloat16"}
        with CacheWriter(tmp_path / str(writeback), "part-000", dtypes, text=FLUX1.text, rows_per_shard=4) as w:
            for r in rows:
                w.add(**r)
        shas[writeback] = [s.sha256 for s in w.shards]
        for s in w.shards:   # the recorded checksum is the file's
            assert files.sha256_file(tmp_path / str(writeback) / s.path) == s.sha256
    assert len(shas[0]) == 3 and shas[0] == shas[1024]
    assert len(started) >= 3   # every shard of the second write asked for write-back at least once
