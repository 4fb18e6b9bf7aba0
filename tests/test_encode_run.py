"""`flux-prep encode` in-process on the tiny model: rows, skips, values, T5 modes, refusals."""
from __future__ import annotations

import pytest
import torch
from encode_inputs import BAD_EXPECTED_SKIPS, BAD_GOOD_KEYS, LONG_CAPTION, bad_members, truncated_tar, write_tar

from preprocess.decode import PrepOptions
from preprocess.encode import EncodeOptions
from preprocess.encode_run import run_encode
from preprocess.images import prepare_image, to_model_range
from preprocess.progress import SettingsMismatch
from shared.cache import CacheReader
from shared.models import load_clip, load_t5, load_vae
from shared.text import encode_prompts


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
    opts = EncodeOptions(t5_mode=mode, dtype=dtype, compute_dtype="fp32", **kw)
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
    assert [d["id"] for d in m["inputs_done"]] == ["bad-00000", "bad-00001"]
    assert m["t5"] == {"mode": mode, "max_length": 32}
    assert set(m["dtypes"]) == {"latent", "t5", "clip", "latent_logvar"}
    rows = read_rows(out)
    assert set(rows) == BAD_GOOD_KEYS | {f"cut{i:04d}" for i in range(4)}
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
    rows = read_rows(out)
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
                   {"prep": {"buckets": True}}, {"t5_max_length": 16}):
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
    assert sizes == {"w": (6, 12), "s": (8, 8)}
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
