"""A damaged or deleted output shard is repaired by rerunning the encode (`verify --repair` first where
only a checksum sees the damage), ending with exactly the rows of a clean run."""
from __future__ import annotations

import pyarrow.parquet as pq
from encode_inputs import good_members, write_tar
from typer.testing import CliRunner

from preprocess.cli import app
from preprocess.verify import verify_cache
from shared.cache import CacheReader


def _rows(cache) -> dict:
    """key -> every column of the row, read straight from the shards the manifest lists."""
    rows = {}
    for entry in CacheReader(cache).manifest["shards"]:
        for row in pq.read_table(cache / entry["path"]).to_pylist():
            assert row["key"] not in rows, f"duplicate row {row['key']}"
            rows[row["key"]] = row
    return rows


def _encode(tiny_model, raw, out):
    args = ["encode", "--model", str(tiny_model), "--input", str(raw / "r-*.tar"), "--output", str(out),
            "--resolution", "32", "--batch-size", "3", "--num-workers", "0", "--rows-per-shard", "2",
            "--device", "cpu", "--no-progress"]
    return CliRunner().invoke(app, args)


def test_a_rerun_repairs_deleted_shards_and_verify_repair_flipped_bytes(tiny_model, tmp_path):
    raw = tmp_path / "raw"
    for i in range(3):
        write_tar(raw / f"r-{i:05d}.tar", good_members(f"s{i}_", 3))
    clean = tmp_path / "clean"
    assert _encode(tiny_model, raw, clean).exit_code == 0
    out = tmp_path / "cache"
    assert _encode(tiny_model, raw, out).exit_code == 0
    flipped, deleted = out / "raw_r-00000-00001.parquet", out / "raw_r-00002-00000.parquet"
    data = bytearray(flipped.read_bytes())
    data[len(data) // 3] ^= 0xFF                     # the same size: only a checksum sees it
    flipped.write_bytes(bytes(data))
    deleted.unlink()

    rerun = _encode(tiny_model, raw, out)            # the deletion is seen from a listing
    assert "input shard raw_r-00002 (" in rerun.output
    assert "has damaged output shards (raw_r-00002-00000.parquet missing): encoding it again" in rerun.output
    assert "raw_r-00000" not in rerun.output
    assert deleted.exists()
    problems = verify_cache(out)
    assert len(problems) == 1 and "raw_r-00000-00001.parquet: sha256 differs" in problems[0]

    command = CacheReader(out).manifest["command"]
    repaired = CliRunner().invoke(app, ["verify", "--repair", str(out)])
    assert repaired.exit_code == 1
    assert "REPAIR input shard raw_r-00000 (" in repaired.output
    assert "raw_r-00000-00001.parquet: sha256" in repaired.output
    assert f"rerun the encode to encode those inputs again: {command}" in repaired.output
    assert not (out / "manifest.json").exists() and not flipped.exists()
    assert not (out / "_progress/done/raw_r-00000.json").exists()

    again = _encode(tiny_model, raw, out)
    assert again.exit_code == 0, again.output
    assert "1 input shards encoded (2 were done" in again.output
    assert verify_cache(out) == []
    assert _rows(out) == _rows(clean)
    assert CliRunner().invoke(app, ["verify", "--repair", str(out)]).exit_code == 0   # nothing left to repair
