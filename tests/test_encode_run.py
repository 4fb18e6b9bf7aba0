"""`flux-prep encode` in-process on the tiny model: rows, skips, values, T5 modes, refusals."""
from __future__ import annotations

import sys

import pytest
import torch
from encode_inputs import (BAD_EXPECTED_SKIPS, BAD_GOOD_KEYS, LONG_CAPTION, bad_members, good_members, truncated_tar,
                           write_tar)

from preprocess.decode import PrepOptions
from preprocess.encode import EncodeOptions
from preprocess.encode_run import run_encode
from preprocess.images import prepare_image, to_model_range
from preprocess.ledger import SettingsMismatch
from preprocess.verify import cache_warnings, verify_cache
from shared.cache import CacheReader
from shared.family.flux1_text import encode_prompts, load_clip, load_t5
from shared.models import ModelLoadError
from shared.family import load_vae


def read_rows(cache) -> dict:
    reader = CacheReader(cache)
    rows = {}
    for shard in reader.shards:
        for g in reader.iter_shard(shard):
            for i, key in enumerate(g["key"]):
                assert key not in rows, f"duplicate row {key}"
                rows[key] = {c: g[c][i] for c in ("caption", "latent", "t5", "clip", "t5_len", "width", "height")}
    assert len(rows) == reader.manifest["rows"]
    return rows


def _encode(tiny_model, spec, out, mode="padded", dtype="fp32", **kw):
    prep = PrepOptions(**{"resolution": 32, "min_size": 16, **kw.pop("prep", {})})
    opts = EncodeOptions(text_mode=mode, dtype=dtype, compute_dtype="fp32", **kw)
    return run_encode(str(tiny_model), spec, out, prep=prep, opts=opts, batch_size=3, num_workers=0,
                      rows_per_shard=2, device="cpu", progress=False)


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad_inputs")
    write_tar(folder / "bad-00000.tar", bad_members())
    truncated_tar(folder / "bad-00001.tar", n_complete=4)
    return folder


@pytest.fixture(scope="module")
def text_models(tiny_model):
    return (*load_t5(str(tiny_model)), *load_clip(str(tiny_model)))


@pytest.mark.parametrize("mode", ["padded", "trimmed"])
def test_bad_inputs_rows_skips_and_values(tiny_model, bad_inputs, text_models, tmp_path, mode):
    out = tmp_path / "cache"
    stats = _encode(tiny_model, str(bad_inputs / "bad-*.tar"), out, mode=mode, store_logvar=True)
    assert stats["manifest_written"]
    reader = CacheReader(out)
    m = reader.manifest
    assert m["skipped"] == {**BAD_EXPECTED_SKIPS, "truncated_tar": 1}
    assert [d["id"] for d in m["inputs_done"]] == [f"{bad_inputs.name}_bad-00000", f"{bad_inputs.name}_bad-00001"]
    assert m["t5"] == {"mode": mode, "max_length": 32}
    assert set(m["dtypes"]) == {"latent", "t5", "clip", "latent_logvar"}
    rows = read_rows(out)
    prefix = f"{bad_inputs.name}/bad-0000"
    assert set(rows) == {f"{prefix}0/{k}" for k in BAD_GOOD_KEYS} | {f"{prefix}1/cut{i:04d}" for i in range(4)}
    rows = {k.rsplit("/", 1)[1]: row for k, row in rows.items()}
    assert rows["long"]["caption"] == LONG_CAPTION     # stored whole, truncated only by the tokenizer
    assert rows["jsoncap"]["caption"] == "caption from json"

    keys = sorted(rows)
    captions = [rows[k]["caption"] for k in keys]
    ref = encode_prompts(captions, *text_models, t5_mode=mode, t5_max_length=32)
    for i, k in enumerate(keys):
        n = int(ref["t5_len"][i])
        assert int(rows[k]["t5_len"]) == n
        expected_t5 = ref["t5"][i] if mode == "padded" else ref["t5"][i, :n]
        assert rows[k]["t5"].shape == expected_t5.shape == ((32 if mode == "padded" else n), 64)
        torch.testing.assert_close(rows[k]["t5"], expected_t5, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(rows[k]["clip"], ref["clip"][i], atol=1e-5, rtol=1e-4)
    assert int(rows["long"]["t5_len"]) == 32

    empty = reader.empty_prompt()
    ref_empty = encode_prompts([""], *text_models, t5_mode=mode, t5_max_length=32)
    assert empty["t5"].shape[0] == (32 if mode == "padded" else int(empty["t5_len"]))
    torch.testing.assert_close(empty["clip"], ref_empty["clip"][0])


def test_latents_are_the_vae_posterior_mean(tiny_model, bad_inputs, tmp_path):
    out = tmp_path / "cache"
    _encode(tiny_model, str(bad_inputs / "bad-00000.tar"), out)
    rows = {k.rsplit("/", 1)[1]: row for k, row in read_rows(out).items()}
    data = dict(bad_members())["good0000.jpg"]
    prepared = prepare_image(data, 32)
    vae = load_vae(str(tiny_model))
    with torch.no_grad():
        mean = vae.encode(to_model_range(prepared.pixels)[None]).latent_dist.mean[0]
    assert rows["good0000"]["latent"].shape == (16, 4, 4)
    torch.testing.assert_close(rows["good0000"]["latent"], mean, atol=1e-5, rtol=1e-4)
    assert (int(rows["good0000"]["width"]), int(rows["good0000"]["height"])) == (48, 40)


def test_changed_options_are_refused_and_rerun_is_a_no_op(tiny_model, bad_inputs, tmp_path):
    out = tmp_path / "cache"
    spec = str(bad_inputs / "bad-00001.tar")
    _encode(tiny_model, spec, out)
    before = {p.name: p.read_bytes() for p in out.glob("*.parquet")}
    again = _encode(tiny_model, spec, out)
    assert again["rows"] == 0 and again["shards_skipped_done"] == 1 and again["manifest_written"]
    assert {p.name: p.read_bytes() for p in out.glob("*.parquet")} == before
    for change in ({"mode": "trimmed"}, {"dtype": "bf16"}, {"store_logvar": True},
                   {"prep": {"buckets": True}}, {"text_max_length": 16}):
        with pytest.raises(SettingsMismatch, match="refusing to mix"):
            _encode(tiny_model, spec, out, **change)
    assert {p.name: p.read_bytes() for p in out.glob("*.parquet")} == before


def test_buckets_record_latent_size(tiny_model, tmp_path):
    from encode_inputs import image_bytes
    write_tar(tmp_path / "wide-00000.tar", [("w.jpg", image_bytes((96, 48))), ("w.txt", b"wide"),
                                            ("s.jpg", image_bytes((48, 48))), ("s.txt", b"square")])
    out = tmp_path / "cache"
    _encode(tiny_model, str(tmp_path / "wide-00000.tar"), out, prep={"buckets": True, "resolution": 64})
    reader = CacheReader(out)
    sizes = {k: (int(h), int(w)) for shard in reader.shards for g in reader.iter_shard(shard)
             for k, h, w in zip(g["key"], g["latent_h"], g["latent_w"])}
    assert sizes == {f"{tmp_path.name}/wide-00000/w": (6, 12), f"{tmp_path.name}/wide-00000/s": (8, 8)}
    assert reader.manifest["image"]["buckets"][0] == [32, 128]


def test_a_changed_image_folder_is_refused_on_resume(tiny_model, tmp_path):
    """Folder shards are runs of the sorted file list: after files are added, a done shard id would
    name other samples, so the rerun refuses instead of skipping or duplicating them."""
    from encode_inputs import image_bytes

    from preprocess.sources import InputError
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("b", "c"):
        (folder / f"{name}.jpg").write_bytes(image_bytes((40, 40)))
        (folder / f"{name}.txt").write_text(f"image {name}")
    out = tmp_path / "cache"
    assert _encode(tiny_model, str(folder), out)["rows"] == 2
    assert _encode(tiny_model, str(folder), out)["shards_skipped_done"] == 1      # unchanged: a no-op
    (folder / "a.jpg").write_bytes(image_bytes((40, 40)))
    (folder / "a.txt").write_text("image a")
    with pytest.raises(InputError, match="holds other samples than when it was encoded"):
        _encode(tiny_model, str(folder), out)
    assert set(read_rows(out)) == {"b", "c"}


def test_cuda_without_a_gpu_refused_before_anything_is_written(tiny_model, bad_inputs, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "cache"
    with pytest.raises(ValueError, match="no CUDA GPU is available"):
        run_encode(str(tiny_model), str(bad_inputs / "bad-*.tar"), out, prep=PrepOptions(resolution=32),
                   opts=EncodeOptions(), device="cuda", progress=False)
    assert not out.exists()


def test_a_done_shard_stays_done_when_the_spec_grows_and_equal_keys_stay_apart(tiny_model, tmp_path):
    """a/x-00000.tar, then a/x-00000.tar::b/x-00000.tar (two img2dataset-like folders: the same keys):
    a is not encoded again, b's rows are kept apart by their shard's prefix, and no key is written twice."""
    a = write_tar(tmp_path / "a/x-00000.tar", good_members("s", 3))
    b = write_tar(tmp_path / "b/x-00000.tar", good_members("s", 2))
    out = tmp_path / "cache"
    assert _encode(tiny_model, str(a), out)["rows"] == 3
    again = _encode(tiny_model, f"{a}::{b}", out)
    assert again["shards_skipped_done"] == 1 and again["rows"] == 2
    assert sorted(read_rows(out)) == [f"a/x-00000/s000{i}" for i in range(3)] + [f"b/x-00000/s000{i}" for i in range(2)]
    assert verify_cache(out) == []
    only_b = _encode(tiny_model, str(b), out)   # the manifest covers the shards of the current --input only
    assert only_b["rows"] == 0 and sorted(read_rows(out)) == [f"b/x-00000/s000{i}" for i in range(2)]
    assert verify_cache(out) == []
    assert any("output of input shard a_x-00000" in w for w in cache_warnings(out))


def test_the_same_tar_typed_relative_then_absolute_is_done(tiny_model, tmp_path, monkeypatch):
    path = write_tar(tmp_path / "data/x-00000.tar", good_members("s", 2))
    out = tmp_path / "cache"
    monkeypatch.chdir(tmp_path)
    assert _encode(tiny_model, "data/x-00000.tar", out)["rows"] == 2
    again = _encode(tiny_model, str(path), out)
    assert again["shards_skipped_done"] == 1 and again["rows"] == 0
    assert len(read_rows(out)) == 2


def test_a_replaced_input_is_encoded_again_its_old_rows_removed(tiny_model, tmp_path, capsys):
    path = truncated_tar(tmp_path / "dl/x-00000.tar", n_complete=2)   # a download cut off
    out = tmp_path / "cache"
    assert _encode(tiny_model, str(path), out)["rows"] == 2
    write_tar(path, good_members("cut", 5))                           # the complete file replaces it
    again = _encode(tiny_model, str(path), out)
    assert again["shards_reencoded"] == 1 and again["rows"] == 5
    assert "input shard dl_x-00000" in capsys.readouterr().err
    assert sorted(read_rows(out)) == [f"dl/x-00000/cut{i:04d}" for i in range(5)]
    assert verify_cache(out) == []     # the first run's output shards are gone, not merely unlisted
    assert _encode(tiny_model, str(path), out)["shards_skipped_done"] == 1


def test_inputs_that_yield_nothing_are_named_the_run_exits_1_and_they_are_read_once_fixed(tiny_model, tmp_path):
    from typer.testing import CliRunner

    from preprocess.cli import app
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "x-00000.tar").write_text("a caption file, renamed\n")
    write_tar(raw / "x-00001.tar", [])
    out = tmp_path / "cache"
    args = ["encode", "--model", str(tiny_model), "--input", str(raw / "x-*.tar"), "--output", str(out),
            "--resolution", "32", "--batch-size", "3", "--num-workers", "0", "--device", "cpu", "--no-progress"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 1, first.output
    assert "holds no rows" in first.output
    assert "raw_x-00000" in first.output and "unreadable_shard" in first.output
    assert "raw_x-00001" in first.output and "empty_shard" in first.output
    inspected = CliRunner().invoke(app, ["inspect", str(out)])
    assert "unreadable_shard       1" in inspected.output and "empty_shard            1" in inspected.output
    write_tar(raw / "x-00000.tar", good_members("s", 2))
    fixed = CliRunner().invoke(app, args)
    assert fixed.exit_code == 0, fixed.output
    assert sorted(read_rows(out)) == ["raw/x-00000/s0000", "raw/x-00000/s0001"]


def test_a_missing_model_folder_is_refused_leaving_no_output(bad_inputs, tmp_path):
    out = tmp_path / "cache"
    with pytest.raises(ModelLoadError, match="no such folder"):
        run_encode(str(tmp_path / "no-model"), str(bad_inputs / "bad-*.tar"), out, prep=PrepOptions(resolution=32),
                   opts=EncodeOptions(), num_workers=2, device="cpu", progress=False)
    assert not out.exists()


def test_channels_last_is_accepted_as_a_deprecated_no_op(bad_inputs, tmp_path):
    """--channels-last (NHWC VAE input, measured slower) still parses; it warns and changes nothing."""
    from typer.testing import CliRunner

    from preprocess.cli import app
    args = ["encode", "--model", str(tmp_path / "no-model"), "--input", str(bad_inputs / "bad-*.tar"),
            "--output", str(tmp_path / "cache"), "--device", "cpu", "--no-progress"]
    plain, flagged = CliRunner().invoke(app, args), CliRunner().invoke(app, args + ["--channels-last"])
    assert "--channels-last is deprecated and does nothing" in flagged.output
    assert "deprecated" not in plain.output
    assert flagged.exit_code == plain.exit_code == 2 and "no such folder" in flagged.output
    assert not (tmp_path / "cache").exists()


def _encode_cli(args, argv_monkeypatch=None):
    from typer.testing import CliRunner

    from preprocess.cli import app
    if argv_monkeypatch is not None:    # the manifest records sys.argv, as the console script sets it
        argv_monkeypatch.setattr(sys, "argv", ["flux-prep", *args])
    return CliRunner().invoke(app, args)


def test_config_gives_the_options_a_flag_overrides_it_and_the_manifest_records_the_flags(tiny_model, bad_inputs,
                                                                                         tmp_path, monkeypatch):
    """--config FILE: its encode section gives encode's options (the other sections are other stages'),
    a flag given beside it wins, and the manifest records the flags the file gave, not the file's name."""
    params = tmp_path / "params.yaml"
    params.write_text("train: {data: {batch_size: 9}}\n"
                      "encode:\n  resolution: 48\n  min_size: 16\n  t5_mode: trimmed\n  t5_max_length: 16\n"
                      "  batch_size: 3\n  num_workers: 0\n  device: cpu\n  dtype: fp32\n  progress: false\n")
    out = tmp_path / "cache"
    args = ["encode", "--model", str(tiny_model), "--input", str(bad_inputs / "bad-00001.tar"), "--output", str(out),
            "--config", str(params), "--resolution", "32"]
    r = _encode_cli(args, monkeypatch)
    assert r.exit_code == 0, r.output
    manifest = CacheReader(out).manifest
    assert manifest["t5"] == {"mode": "trimmed", "max_length": 16} and manifest["dtypes"]["latent"] == "float32"
    assert {tuple(row["latent"].shape) for row in read_rows(out).values()} == {(16, 4, 4)}   # 32 px, not 48
    assert manifest["command"] == (
        f"flux-prep encode --model {tiny_model} --input {bad_inputs / 'bad-00001.tar'} --output {out} "
        "--min-size 16 --t5-mode trimmed --t5-max-length 16 --batch-size 3 --num-workers 0 --device cpu "
        "--dtype fp32 --no-progress --resolution 32")
    # The same settings as flags give the same cache: the file changes nothing but where they are written.
    flags = manifest["command"].split()[2:]
    by_flags = _encode_cli(["encode", *flags[:5], str(tmp_path / "by-flags"), *flags[6:]])
    assert by_flags.exit_code == 0, by_flags.output
    assert read_rows(tmp_path / "by-flags").keys() == read_rows(out).keys()
    for key, row in read_rows(tmp_path / "by-flags").items():
        assert torch.equal(row["latent"], read_rows(out)[key]["latent"])


@pytest.mark.parametrize("section, message", [
    ("resolutoin: 32", r"params.yaml: unknown key 'resolutoin' in the encode section; encode takes batch_size, "),
    ("trained: lora", r"unknown key 'trained'"),
    ("resolution: 1.5", r"params.yaml: encode.resolution: .*integer.*\(got 1.5\)"),
    ("resolution: [32]", r"encode.resolution: one value, not a list"),
    ("progress: sometimes", r"encode.progress: .*boolean"),
    ("writer_threads: 0", r"encode.writer_threads: .*greater than or equal to 1"),
    ("t5_mode: padd", r"encode.t5_mode: .*'padd' is not one of 'padded', 'trimmed'\. \(got 'padd'\)"),
    ("compute_dtype: f32", r"encode.compute_dtype: .*'f32' is not one of 'bf16', 'fp16', 'fp32', 'bfloat16'"),
])
def test_a_bad_config_key_or_value_is_refused_naming_the_file_and_key(bad_inputs, tmp_path, section, message):
    import re
    params = tmp_path / "params.yaml"
    params.write_text(f"encode:\n  {section}\n")
    out = tmp_path / "cache"
    r = _encode_cli(["encode", "--model", str(tmp_path / "no-model"), "--input", str(bad_inputs / "bad-*.tar"),
                     "--output", str(out), "--config", str(params)])
    assert r.exit_code == 2, r.output
    assert re.search(message, " ".join(r.output.replace("│", " ").split())), r.output
    assert not out.exists()
