"""`flux-prep plan` against what `flux-prep encode` then writes: rows exactly, bytes within 5%."""
import json

import pytest
from typer.testing import CliRunner

from preprocess.cli import app
from shared.cache import CacheReader


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from preprocess.demo import write_demo_shards
    folder = tmp_path_factory.mktemp("demo")
    write_demo_shards(folder, num_samples=40, size=40, samples_per_shard=10, seed=3)
    return folder


def _args(command, model, demo, out, mode):
    return [command, "--model", str(model), "--input", str(demo / "demo-*.tar"), "--output", str(out),
            "--resolution", "32", "--t5-mode", mode, "--batch-size", "8", "--num-workers", "0",
            "--rows-per-shard", "16", "--device", "cpu", "--no-progress"]


@pytest.mark.parametrize("mode", ["trimmed", "padded"])
def test_the_plan_matches_the_encode(tiny_model, demo, tmp_path, mode):
    runner = CliRunner()
    planned = runner.invoke(app, _args("plan", tiny_model, demo, tmp_path / "c", mode) + ["--json", "--sample-shards", "2"])
    assert planned.exit_code == 0, planned.output
    p = json.loads(planned.stdout)
    assert not (tmp_path / "c").exists()                       # a plan writes nothing
    assert p["sampled_shards"] == 2 and p["input_shards"] == 4
    assert runner.invoke(app, _args("encode", tiny_model, demo, tmp_path / "c", mode)).exit_code == 0
    m = CacheReader(tmp_path / "c").manifest
    actual = sum(s["bytes"] for s in m["shards"])
    assert p["rows"] == m["rows"] == 40
    assert abs(p["total_bytes"] - actual) / actual < 0.05, (p["total_bytes"], actual)
    assert p["bytes_per_sample"] == p["modes"]["trimmed" if mode == "trimmed" else "padded-32"]["bytes_per_sample"]
    assert set(p["modes"]) == {"trimmed", "padded-32"}


def test_the_plan_counts_images_below_min_size_and_prints_every_mode(tiny_model, demo, tmp_path):
    result = CliRunner().invoke(app, _args("plan", tiny_model, demo, tmp_path / "c", "padded") + ["--min-size", "41"])
    assert result.exit_code == 0, result.output
    assert "below --min-size 41: 100.0% of the sampled images" in result.stdout
    assert "rows           0 expected" in result.stdout
    assert "padded-32 *" in result.stdout and "trimmed" in result.stdout
