"""`flux-prep inspect` and `flux-prep verify` on a cache written through the real writer."""
import json

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from preprocess.cli import app
from shared.cache import CacheWriter, cache_manifest, write_manifest
from shared.family.flux1 import FLUX1

DTYPES = dict.fromkeys(("latent", "t5", "clip"), "bfloat16")


@pytest.fixture
def cache(tmp_path):
    g = torch.Generator().manual_seed(0)
    with CacheWriter(tmp_path, "part-000", DTYPES, text=FLUX1.text, rows_per_shard=4, row_group_rows=2) as w:
        for i in range(10):
            n = 3 + i % 5
            w.add(key=f"{i:04d}", caption="a red circle " + "x " * i, latent=torch.randn(16, 4, 4, generator=g),
                  t5=torch.randn(n, 8, generator=g), t5_len=n, clip=torch.randn(12, generator=g),
                  width=64, height=64)
    save_file({"t5": torch.zeros(1, 8), "clip": torch.zeros(12), "t5_len": torch.tensor(1)},
              tmp_path / "empty_prompt.safetensors")
    write_manifest(tmp_path, _manifest(w.shards, skipped={"corrupt_image": 2, "no_caption": 1}))
    return tmp_path


def _run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_inspect_summary(cache):
    result = _run("inspect", cache)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "rows       10" in out and "shards     3" in out
    assert "t5_len         min 3  mean 5.0  p50 5  p90 7  max 7" in out
    assert "latent sizes   4x4: 10" in out
    assert "corrupt_image" in out and "skipped        3" in out
    latent_line = next(line for line in out.splitlines() if line.strip().startswith("latent "))
    assert int(latent_line.split()[-1].replace(",", "")) >= 16 * 4 * 4 * 2  # bf16 bytes per sample


def test_verify_ok(cache):
    result = _run("verify", cache)
    assert result.exit_code == 0 and "OK" in result.output


def test_verify_truncated_shard(cache):
    shard = cache / "part-000-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:-100])
    result = _run("verify", cache)
    assert result.exit_code == 1 and "part-000-00001.parquet" in result.output and "truncated" in result.output


def test_verify_altered_shard(cache):
    shard = cache / "part-000-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[200] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = _run("verify", cache)
    assert result.exit_code == 1 and "part-000-00000.parquet: sha256 differs" in result.output


def test_verify_missing_and_unlisted_shard(cache):
    (cache / "part-000-00002.parquet").rename(cache / "stray.parquet")
    result = _run("verify", cache)
    assert result.exit_code == 1
    assert "part-000-00002.parquet: missing" in result.output
    assert "stray.parquet: shard not listed" in result.output


def test_verify_wrong_row_count_in_manifest(cache):
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["shards"][0]["rows"] = 5
    (cache / "manifest.json").write_text(json.dumps(manifest))
    result = _run("verify", cache)
    assert result.exit_code == 1 and "part-000-00000.parquet: 4 rows, manifest says 5" in result.output


def test_verify_not_a_cache(tmp_path):
    result = _run("verify", tmp_path)
    assert result.exit_code == 1 and "no manifest.json" in result.output


def _write_rows(folder, prefix, keys):
    g = torch.Generator().manual_seed(len(prefix))
    with CacheWriter(folder, prefix, DTYPES, text=FLUX1.text, rows_per_shard=8) as w:
        for key in keys:
            w.add(key=key, caption="a caption", latent=torch.randn(16, 4, 4, generator=g), t5=torch.randn(3, 8),
                  t5_len=3, clip=torch.randn(12), width=64, height=64)
    return w.shards


def _manifest(shards, **extra):
    return cache_manifest(family=FLUX1, dtypes=DTYPES, dims={"latent_channels": 16, "t5_dim": 8, "clip_dim": 12},
                          text={"mode": "trimmed", "max_length": 32}, shards=shards, **extra)


def test_manifest_writer_and_verify_refuse_a_repeated_key(tmp_path):
    from shared.cache import CacheError, atomic_write_json
    shards = _write_rows(tmp_path, "a", ["k0", "k1", "k2"]) + _write_rows(tmp_path, "b", ["k1", "k3"])
    save_file({"t5": torch.zeros(1, 8), "clip": torch.zeros(12), "t5_len": torch.tensor(1)},
              tmp_path / "empty_prompt.safetensors")
    with pytest.raises(CacheError, match=r"repeat keys: key 'k1' is in 2 rows, of a-00000.parquet, b-00000.parquet"):
        write_manifest(tmp_path, _manifest(shards))
    assert not (tmp_path / "manifest.json").exists()
    atomic_write_json(tmp_path / "manifest.json", {"schema_version": 1, **_manifest(shards)})   # an unchecked writer
    result = _run("verify", tmp_path)
    assert result.exit_code == 1
    assert "key 'k1' is in 2 rows, of a-00000.parquet, b-00000.parquet" in result.output


def test_empty_cache_verify_warns_and_inspect_shows_skips_by_reason(tmp_path):
    save_file({"t5": torch.zeros(1, 8), "clip": torch.zeros(12), "t5_len": torch.tensor(1)},
              tmp_path / "empty_prompt.safetensors")
    gone = {"id": "raw_x-00000", "url": "raw/x-00000.tar", "skipped": {"unreadable_shard": 1}}
    write_manifest(tmp_path, _manifest([], skipped={"unreadable_shard": 1}, inputs_without_rows=[gone]))
    result = _run("verify", tmp_path)
    assert result.exit_code == 0 and "OK" in result.output
    assert "WARN" in result.output and "holds no rows" in result.output
    assert "raw_x-00000 (raw/x-00000.tar) yielded no row (unreadable_shard 1)" in result.output
    result = _run("inspect", tmp_path)
    assert result.exit_code == 0, result.output
    assert "rows       0" in result.output and "skipped        1" in result.output
    assert "unreadable_shard" in result.output and "raw_x-00000 (raw/x-00000.tar)" in result.output


def test_inspect_missing_or_damaged_cache_prints_verifys_messages(cache, tmp_path):
    result = _run("inspect", tmp_path / "nowhere")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert result.output.strip() == f"FAIL {tmp_path / 'nowhere'}: no manifest.json; not a flux-prep cache, " \
                                    "or its encode has not finished"
    shard = cache / "part-000-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:-100])
    inspected, verified = _run("inspect", cache), _run("verify", cache)
    assert inspected.exit_code == 1 and isinstance(inspected.exception, SystemExit)
    assert inspected.output.strip() == verified.output.strip()
    assert "part-000-00001.parquet" in inspected.output and "truncated" in inspected.output
