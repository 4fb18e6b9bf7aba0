"""The cache contract: bit-exact round trips, atomic shards, manifest checks."""
import json

import pyarrow.parquet as pq
import pytest
import torch

from shared.cache import CacheError, CacheReader, CacheWriter, cache_manifest, read_manifest, write_manifest
from shared.family.flux1 import FLUX1


def _rand(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 3).to(dtype)


def _write_cache(path, rows, *, mode, dtypes, rows_per_shard=3, row_group_rows=2, logvar=False):
    with CacheWriter(path, "part-000", dtypes, text=FLUX1.text, rows_per_shard=rows_per_shard,
                     row_group_rows=row_group_rows) as w:
        for r in rows:
            w.add(**r, latent_logvar=r["latent"] * 0.5 if logvar else None)
    max_len = max(r["t5"].shape[0] for r in rows)
    write_manifest(path, cache_manifest(family=FLUX1, dtypes=dtypes,
                                        dims={"latent_channels": 16, "t5_dim": 8, "clip_dim": 12},
                                        text={"mode": mode, "max_length": max_len}, shards=w.shards))
    return w.shards


def _rows(n, *, trimmed, dtype, sizes=((4, 6),)):
    rows = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        length = 3 + (i * 5) % 9 if trimmed else 11
        rows.append(dict(key=f"k{i:03d}", caption=f"caption {i} ü", latent=_rand((16, h, w), dtype, i),
                         t5=_rand((length, 8), dtype, 100 + i), t5_len=length if trimmed else 5 + i % 3,
                         clip=_rand((12,), dtype, 200 + i), width=100 + i, height=80 + i))
    return rows


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_tensor_bytes_round_trip_bit_exact(tmp_path, dtype):
    """Writer -> Parquet -> reader keeps every bit of every tensor column, NaN, inf, -0 and tiny values included."""
    dt = getattr(torch, dtype)
    latent, t5, clip = _rand((16, 4, 6), dt, 0), _rand((7, 8), dt, 1), _rand((12,), dt, 2)
    latent.view(-1)[:5] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-30]).to(dt)
    dtypes = dict.fromkeys(("latent", "t5", "clip"), dtype)
    with CacheWriter(tmp_path, "part-000", dtypes, text=FLUX1.text) as w:
        w.add(key="k", caption="c", latent=latent, t5=t5, t5_len=7, clip=clip, width=48, height=32)
    write_manifest(tmp_path, cache_manifest(family=FLUX1, dtypes=dtypes,
                                        dims={"latent_channels": 16, "t5_dim": 8, "clip_dim": 12},
                                            text={"mode": "trimmed", "max_length": 7}, shards=w.shards))
    group = CacheReader(tmp_path).row_group("part-000-00000.parquet", 0)
    for name, want in (("latent", latent), ("t5", t5), ("clip", clip)):
        got = group[name][0]
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.view(torch.uint8).tolist() == want.view(torch.uint8).tolist(), name


@pytest.mark.parametrize("trimmed", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cache_round_trip(tmp_path, trimmed, dtype):
    name = {torch.bfloat16: "bfloat16", torch.float32: "float32"}[dtype]
    rows = _rows(8, trimmed=trimmed, dtype=dtype, sizes=((4, 6), (6, 4)))
    shards = _write_cache(tmp_path, rows, mode="trimmed" if trimmed else "padded",
                          dtypes={"latent": name, "t5": name, "clip": name}, logvar=True)
    assert [s.rows for s in shards] == [3, 3, 2]
    reader = CacheReader(tmp_path)
    assert reader.num_rows == 8
    seen = []
    for shard in reader.shards:
        for group in reader.iter_shard(shard):
            for j, key in enumerate(group["key"]):
                i = int(key[1:])
                lat = group["latent"][j]
                assert torch.equal(lat, rows[i]["latent"])
                assert torch.equal(group["latent_logvar"][j], rows[i]["latent"] * 0.5)
                assert torch.equal(group["t5"][j], rows[i]["t5"])
                assert torch.equal(group["clip"][j], rows[i]["clip"])
                assert group["t5_len"][j] == rows[i]["t5_len"]
                assert group["caption"][j] == rows[i]["caption"]
                assert (group["width"][j], group["height"][j]) == (rows[i]["width"], rows[i]["height"])
                seen.append(key)
    assert seen == [r["key"] for r in rows]


def test_same_shapes_decode_as_one_stacked_tensor(tmp_path):
    rows = _rows(4, trimmed=False, dtype=torch.bfloat16)
    _write_cache(tmp_path, rows, mode="padded", dtypes=dict.fromkeys(("latent", "t5", "clip"), "bfloat16"),
                 rows_per_shard=10, row_group_rows=4)
    group = next(CacheReader(tmp_path).iter_shard("part-000-00000.parquet"))
    assert group["latent"].shape == (4, 16, 4, 6) and group["t5"].shape == (4, 11, 8)
    assert group["latent_logvar"] is None
    assert torch.equal(group["latent"], torch.stack([r["latent"] for r in rows]))


def test_row_groups_sized_by_bytes(tmp_path):
    rows = _rows(10, trimmed=False, dtype=torch.float32)
    dtypes = dict.fromkeys(("latent", "t5", "clip"), "float32")
    with CacheWriter(tmp_path, "p", dtypes, text=FLUX1.text, rows_per_shard=100, row_group_rows=100,
                     row_group_bytes=5000) as w:
        for r in rows:
            w.add(**r)
    meta = pq.ParquetFile(tmp_path / "p-00000.parquet").metadata
    per_row = 16 * 4 * 6 * 4 + 11 * 8 * 4 + 12 * 4
    assert meta.num_row_groups == -(-10 // -(-5000 // per_row))
    assert meta.num_rows == 10


def test_no_partial_shard_visible_and_abort_cleans(tmp_path):
    dtypes = dict.fromkeys(("latent", "t5", "clip"), "bfloat16")
    w = CacheWriter(tmp_path, "p", dtypes, text=FLUX1.text, rows_per_shard=5, row_group_rows=1)
    for r in _rows(7, trimmed=False, dtype=torch.bfloat16):
        w.add(**r)
    visible = sorted(p.name for p in tmp_path.glob("*.parquet"))
    assert visible == ["p-00000.parquet"]       # the second shard is still open
    assert any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    w.abort()
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    assert sorted(p.name for p in tmp_path.glob("*.parquet")) == ["p-00000.parquet"]


def test_shard_checksums_recorded(tmp_path):
    from shared.cache import sha256_file
    shards = _write_cache(tmp_path, _rows(4, trimmed=True, dtype=torch.bfloat16), mode="trimmed",
                          dtypes=dict.fromkeys(("latent", "t5", "clip"), "bfloat16"))
    for s in shards:
        assert s.sha256 == sha256_file(tmp_path / s.path)
        assert s.bytes == (tmp_path / s.path).stat().st_size


def test_manifest_version_and_fields_checked(tmp_path):
    with pytest.raises(CacheError, match="no manifest.json"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 2}))
    with pytest.raises(CacheError, match="schema version 2"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(CacheError, match="not valid JSON"):
        read_manifest(tmp_path)


def test_bad_shapes_refused(tmp_path):
    w = CacheWriter(tmp_path, "p", dict.fromkeys(("latent", "t5", "clip"), "bfloat16"), text=FLUX1.text)
    with pytest.raises(ValueError, match="bad shapes"):
        w.add(key="x", caption="", latent=torch.zeros(16, 4), t5=torch.zeros(3, 8), t5_len=3,
              clip=torch.zeros(12), width=1, height=1)


def _layout(folder):
    """Every shard's name, row-group sizes and rows."""
    out = {}
    for p in sorted(folder.glob("*.parquet")):
        pf = pq.ParquetFile(p)
        out[p.name] = ([pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)],
                       pf.read().to_pylist())
    return out


@pytest.mark.parametrize("trimmed", [False, True])
def test_add_batch_equals_adding_rows_one_by_one(tmp_path, trimmed):
    """The batch path (tensors [B, ...] or lists) splits row groups and shards exactly as `add`."""
    rows = _rows(11, trimmed=trimmed, dtype=torch.float32)
    for r in rows:
        r["latent_logvar"] = -r["latent"]
    dtypes = {**dict.fromkeys(("latent", "t5", "clip"), "bfloat16"), "latent_logvar": "float16"}
    limits = dict(rows_per_shard=5, row_group_rows=3, row_group_bytes=3000)
    with CacheWriter(tmp_path / "one", "p", dtypes, text=FLUX1.text, **limits) as w:
        for r in rows:
            w.add(**r)
    with CacheWriter(tmp_path / "batch", "p", dtypes, text=FLUX1.text, **limits) as w:
        for lo, hi in ((0, 4), (4, 5), (5, 11)):
            part = rows[lo:hi]

            def col(c):
                values = [r[c] for r in part]
                return values if trimmed and c == "t5" else torch.stack(values)
            w.add_batch(keys=[r["key"] for r in part], captions=[r["caption"] for r in part],
                        latent=col("latent"), t5=col("t5"), clip=col("clip"), latent_logvar=col("latent_logvar"),
                        t5_len=[r["t5_len"] for r in part], widths=[r["width"] for r in part],
                        heights=[r["height"] for r in part])
    one, batch = _layout(tmp_path / "one"), _layout(tmp_path / "batch")
    assert len(one) == 3 and [g for g, _ in one.values()][0] != [5]   # several shards, several row groups
    assert batch == one


def test_add_batch_does_not_alias_the_callers_tensors(tmp_path):
    rows = _rows(2, trimmed=False, dtype=torch.float32)
    dtypes = dict.fromkeys(("latent", "t5", "clip"), "float32")
    latent = torch.stack([r["latent"] for r in rows])
    w = CacheWriter(tmp_path, "p", dtypes, text=FLUX1.text, row_group_rows=100)
    w.add_batch(keys=["a", "b"], captions=["", ""], latent=latent, t5=torch.stack([r["t5"] for r in rows]),
                clip=torch.stack([r["clip"] for r in rows]), t5_len=[1, 1], widths=[1, 1], heights=[1, 1])
    expected = latent.clone()
    latent.zero_()          # the caller reuses its buffer before the row group is written
    w.close()
    reader_rows = pq.read_table(tmp_path / "p-00000.parquet").to_pylist()
    assert reader_rows[0]["latent"] == expected[0].numpy().astype("<f4").tobytes()   # numpy's little-endian bytes


def test_add_batch_without_copy_writes_the_same_shard(tmp_path):
    rows = _rows(3, trimmed=False, dtype=torch.bfloat16)
    dtypes = dict.fromkeys(("latent", "t5", "clip"), "bfloat16")
    shas = []
    for copy in (True, False):
        w = CacheWriter(tmp_path / str(copy), "p", dtypes, text=FLUX1.text, row_group_rows=2)
        w.add_batch(keys=["a", "b", "c"], captions=["x", "y", "z"], latent=torch.stack([r["latent"] for r in rows]),
                    t5=torch.stack([r["t5"] for r in rows]), clip=torch.stack([r["clip"] for r in rows]),
                    t5_len=[1, 1, 1], widths=[8, 8, 8], heights=[8, 8, 8], copy=copy)
        [shard] = w.close()
        shas.append(shard.sha256)
    assert shas[0] == shas[1]
