"""Encode's progress bar has a total (so an ETA): folder shards exactly, tars estimated from the first
one's headers, then from what each encoded tar held."""
from __future__ import annotations

import gzip
import shutil

import pytest

from preprocess.decode import PrepOptions
from preprocess.demo import write_demo_shards
from preprocess.encode import EncodeOptions
from preprocess.encode_bar import EncodeBar, count_local_tar_samples
from preprocess.encode_run import run_encode
from preprocess.sources import resolve_inputs


@pytest.fixture(scope="module")
def tars(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo")
    write_demo_shards(folder, num_samples=20, size=16, samples_per_shard=8)   # 8 + 8 + 4 samples
    return folder


def test_counts_a_local_tars_samples_from_its_headers(tars, tmp_path):
    shards = sorted(tars.glob("*.tar"))
    assert [count_local_tar_samples(str(p)) for p in shards] == [8, 8, 4]
    assert count_local_tar_samples("file://" + str(shards[0])) == 8
    packed = tmp_path / "x.tar.gz"
    packed.write_bytes(gzip.compress(shards[0].read_bytes()))
    assert count_local_tar_samples(str(packed)) is None            # would read all of it: not counted
    assert count_local_tar_samples("s3://bucket/x.tar") is None
    (tmp_path / "junk.tar").write_bytes(b"not a tar" * 100)
    assert count_local_tar_samples(str(tmp_path / "junk.tar")) is None


def test_tar_total_from_the_first_tar_then_from_what_each_held(tars):
    todo = resolve_inputs(str(tars))
    bar = EncodeBar(todo, rank=0, already_done=0)
    sizes = [s.fingerprint["size"] for s in todo]
    # 8 samples in the first tar's bytes: the others by their size
    assert bar.bar.total == 8 + sum(round(size * 8 / sizes[0]) for size in sizes[1:])
    assert abs(bar.bar.total - 20) <= 2
    for shard, n in zip(todo, (8, 8, 4)):
        bar.advance(shard.id, n - 1, False, skipped=0)
        bar.advance(shard.id, 1, True, skipped=0)
    assert bar.bar.total == bar.bar.n == 20
    bar.close()


def test_folder_total_is_exact(tmp_path):
    for i in range(5):
        (tmp_path / f"{i}.png").write_bytes(b"x")
        (tmp_path / f"{i}.txt").write_text("a caption")
    todo = resolve_inputs(str(tmp_path), folder_shard_samples=2)
    bar = EncodeBar(todo, rank=0, already_done=0)
    assert len(todo) == 3 and bar.bar.total == 5
    bar.close()


def test_a_remote_style_tar_gets_its_total_once_one_is_encoded(tars, tmp_path):
    for p in sorted(tars.glob("*.tar")):    # gzip: not counted up front, as a remote tar is not
        (tmp_path / (p.name + ".gz")).write_bytes(gzip.compress(p.read_bytes()))
    todo = resolve_inputs(str(tmp_path / "*.tar.gz"))
    bar = EncodeBar(todo, rank=0, already_done=0)
    assert len(todo) == 3 and bar.bar.total is None
    bar.advance(todo[0].id, 8, True, skipped=0)
    assert bar.bar.total == 8 + sum(round(s.fingerprint["size"] * 8 / todo[0].fingerprint["size"]) for s in todo[1:])
    bar.close()


def test_encode_shows_the_total_it_reaches(tiny_model, tars, tmp_path, capsys):
    shutil.copy(sorted(tars.glob("*.tar"))[0], tmp_path / "in.tar")
    run_encode(str(tiny_model), str(tmp_path / "in.tar"), tmp_path / "cache", prep=PrepOptions(resolution=16),
               opts=EncodeOptions(text_mode="trimmed", compute_dtype="fp32"), batch_size=3, num_workers=0,
               rows_per_shard=4, device="cpu", progress=True)
    err = capsys.readouterr().err
    assert "encode[rank 0]: 100%" in err and "8/8 [" in err, err
