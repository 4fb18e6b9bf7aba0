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


@pytest.fixture(scope="module")
def mixed_sizes(tmp_path_factory):
    """At resolution 64 (auto --min-size 32): a 16x16 and a 31x80 image (short side under half), a 32x80
    (exactly half: kept) and two full-size 64x64."""
    from encode_inputs import image_bytes, write_tar
    sizes = {"tiny": (16, 16), "thin": (31, 80), "half": (32, 80), "full0": (64, 64), "full1": (64, 64)}
    members = []
    for key, size in sizes.items():
        members += [(f"{key}.jpg", image_bytes(size)), (f"{key}.txt", f"a {key} red square".encode())]
    return write_tar(tmp_path_factory.mktemp("mixed") / "mixed-00000.tar", members)


def _mixed_args(command, model, tar, out, *extra):
    return [command, "--model", str(model), "--input", str(tar), "--output", str(out), "--resolution", "64",
            "--t5-mode", "trimmed", "--batch-size", "8", "--num-workers", "0", "--device", "cpu", "--no-progress",
            *extra]


@pytest.mark.parametrize("extra, min_size, kept", [
    ((), 32, {"half", "full0", "full1"}),                                       # the default: auto
    (("--min-size", "auto"), 32, {"half", "full0", "full1"}),
    (("--min-size", "0"), 0, {"tiny", "thin", "half", "full0", "full1"}),     # keep everything, as before
])
def test_min_size_defaults_to_half_the_resolution_in_encode_and_plan_alike(tiny_model, mixed_sizes, tmp_path,
                                                                           extra, min_size, kept):
    runner = CliRunner()
    encoded = runner.invoke(app, _mixed_args("encode", tiny_model, mixed_sizes, tmp_path / "c", *extra))
    assert encoded.exit_code == 0, encoded.output
    reader = CacheReader(tmp_path / "c")
    m = reader.manifest
    keys = {k.rsplit("/", 1)[1] for s in reader.shards for g in reader.iter_shard(s) for k in g["key"]}
    assert keys == kept and m["rows"] == len(kept)
    too_small = 5 - len(kept)
    assert m["skipped"] == ({"too_small": too_small} if too_small else {})
    assert m["image"]["min_size"] == min_size                  # the resolved number is recorded, not "auto"
    planned = runner.invoke(app, _mixed_args("plan", tiny_model, mixed_sizes, tmp_path / "p", "--json", *extra))
    assert planned.exit_code == 0, planned.output
    p = json.loads(planned.stdout)
    assert p["min_size"] == min_size and p["rows"] == len(kept)
    assert p["skipped"] == m["skipped"] and p["below_min_size"] == pytest.approx(too_small / 5)


@pytest.mark.parametrize("command", ["encode", "plan"])
@pytest.mark.parametrize("value", ["-1", "big", "3.5"])
def test_a_bad_min_size_is_refused_naming_the_option(tiny_model, mixed_sizes, tmp_path, command, value):
    result = CliRunner().invoke(app, _mixed_args(command, tiny_model, mixed_sizes, tmp_path / "c", "--min-size",
                                                 value))
    assert result.exit_code == 2
    assert "--min-size must be auto or a whole number of pixels >= 0" in result.output
    assert not (tmp_path / "c").exists()


def test_a_short_last_tar_in_the_sample_does_not_skew_the_rows(tiny_model, tmp_path):
    """8 tars of 32 samples and a last one of 4 (img2dataset's short last shard): the sample of 3 takes the
    first, a middle and the short one. Scaled by count it predicted 204 rows for 260; by bytes, about 260."""
    from preprocess.demo import write_demo_shards
    write_demo_shards(tmp_path / "raw", num_samples=8 * 32 + 4, size=40, samples_per_shard=32, seed=3)
    result = CliRunner().invoke(app, _args("plan", tiny_model, tmp_path / "raw", tmp_path / "c", "trimmed")
                                + ["--json", "--sample-shards", "3"])
    assert result.exit_code == 0, result.output
    p = json.loads(result.stdout)
    assert p["input_shards"] == 9 and p["sampled_samples"] == 32 + 32 + 4
    assert abs(p["rows"] - 260) / 260 < 0.03, p["rows"]
    assert p["input_bytes"] == sum(f.stat().st_size for f in (tmp_path / "raw").glob("*.tar"))
