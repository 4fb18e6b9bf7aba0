"""Caches on an S3 server (moto's, on 127.0.0.1): written whole or not at all, read row group by row
group with read-ahead, damaged or missing objects named by their URL, by the reader and by verify."""
from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from shared.cache import CacheError, CacheReader, CacheWriter
from shared.family.flux1 import FLUX1
from shared.cache.store import open_store
from train_caches import write_cache

DTYPES = {"latent": "float32", "t5": "float32", "clip": "float32"}


def _s3fs(server):
    import s3fs
    return s3fs.S3FileSystem(skip_instance_cache=True, **server.options())


def _rows(reader: CacheReader) -> dict:
    return {k: (rg["latent"][i].clone(), rg["t5"][i].clone()) for s in reader.shards for rg in reader.iter_shard(s)
            for i, k in enumerate(rg["key"])}


def test_a_remote_cache_reads_as_its_local_copy(s3_bucket, tmp_path):
    remote = write_cache(f"{s3_bucket}/cache", 30, rows_per_shard=8, row_group_rows=3)
    local = write_cache(tmp_path / "cache", 30, rows_per_shard=8, row_group_rows=3)
    a, b = CacheReader(remote), CacheReader(local)
    assert a.manifest["shards"] == b.manifest["shards"]          # the same bytes, the same sha256
    assert [m.num_row_groups for m in a.footers()] == [3, 3, 3, 2]
    ra, rb = _rows(a), _rows(b)
    assert ra.keys() == rb.keys() and len(ra) == 30
    assert all(torch.equal(ra[k][0], rb[k][0]) and torch.equal(ra[k][1], rb[k][1]) for k in ra)
    a.prefetch(a.shards[1], 2)   # read ahead, then read: the same table
    assert a.table(a.shards[1], 2).equals(b.table(b.shards[1], 2))
    assert a.table(a.shards[0], 1, columns=["latent_h"]).equals(b.table(b.shards[0], 1, columns=["latent_h"]))


def test_a_failed_upload_leaves_no_object_and_no_parts(s3_server, s3_bucket):
    """A shard big enough for a multipart upload (two 5 MiB parts), aborted after its first part
    went: nothing is visible, no upload is left open. Committed, it is there whole."""
    options = {**s3_server.options(), "default_block_size": 5 << 20}
    store = open_store(f"{s3_bucket}/cache", options)
    big = torch.randn(3 << 20)       # 12 MiB of float32 rows
    with pytest.raises(RuntimeError):
        with CacheWriter(store, "x", DTYPES, text=FLUX1.text, rows_per_shard=10, row_group_rows=1) as w:
            for i in range(3):
                w.add(key=f"k{i}", caption="c", latent=big.view(1, 1024, -1)[:, :, :1024], t5=big.view(-1, 1024),
                      t5_len=1, clip=torch.zeros(4), width=8, height=8)
            assert w._sink._raw.mpu is not None, "no part was uploaded before the failure"
            raise RuntimeError("the encoder failed")
    fs = _s3fs(s3_server)
    bucket = s3_bucket.removeprefix("s3://")
    assert fs.find(bucket) == []
    assert fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", []) == []
    with CacheWriter(store, "x", DTYPES, text=FLUX1.text, rows_per_shard=10, row_group_rows=1) as w:
        w.add(key="k", caption="c", latent=torch.zeros(1, 8, 8), t5=big.view(-1, 1024)[:2048], t5_len=2048,
              clip=torch.zeros(4), width=8, height=8)
    shard = w.shards[0]
    assert fs.size(f"{bucket}/cache/{shard.path}") == shard.bytes > 5 << 20


def _flip_byte(fs, path: str, offset: int) -> None:
    data = bytearray(fs.cat_file(path))
    data[offset] ^= 0xFF
    fs.pipe_file(path, bytes(data))


def test_a_damaged_or_missing_object_stops_reader_and_verify_naming_its_url(s3_server, s3_bucket):
    from preprocess.cli import app
    url = write_cache(f"{s3_bucket}/cache", 16, rows_per_shard=8, row_group_rows=4)
    fs = _s3fs(s3_server)
    reader = CacheReader(url)
    first, second = reader.shards
    meta = reader.footer(first)
    latent = next(meta.row_group(1).column(c) for c in range(meta.num_columns)
                  if meta.row_group(1).column(c).path_in_schema == "latent")
    _flip_byte(fs, f"{url.removeprefix('s3://')}/{first}", latent.data_page_offset + latent.total_compressed_size - 5)
    reader.row_group(first, 0)                      # the intact row group still reads
    with pytest.raises(CacheError, match=rf"{url}/{first}: row group 1 unreadable"):
        reader.row_group(first, 1)
    fs.rm_file(f"{url.removeprefix('s3://')}/{second}")
    with pytest.raises(CacheError, match=rf"{url}/{second}: shard listed in the manifest is missing"):
        CacheReader(url).footer(second)
    result = CliRunner().invoke(app, ["verify", url])
    assert result.exit_code == 1
    assert f"FAIL {url}/{first}: sha256 differs from the manifest (altered)" in result.output
    assert f"FAIL {url}/{second}: missing" in result.output


def test_no_manifest_unreachable_store_and_bad_storage_options_are_named(s3_bucket, s3_server):
    from preprocess.cli import app
    with pytest.raises(CacheError, match=rf"{s3_bucket}/nothing: no manifest.json"):
        CacheReader(f"{s3_bucket}/nothing")
    dead = {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}, "config_kwargs": {"retries": {"max_attempts": 1}},
            "key": "k", "secret": "s"}
    with pytest.raises(CacheError, match=rf"{s3_bucket}/nothing/manifest.json: unreadable"):
        CacheReader(f"{s3_bucket}/nothing", dead)
    result = CliRunner().invoke(app, ["verify", s3_bucket, "--storage-options", "[1]"])
    assert result.exit_code == 2 and "a JSON object of fsspec options is needed" in result.output
