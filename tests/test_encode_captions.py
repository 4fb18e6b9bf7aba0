"""Several captions per image, cached (preprocess/captions.py, shared/cache/alt_captions.py): read from
multi-line .txt files and .json lists, a prefix, tag-shuffled variants; each caption's encodings are those
of a single-caption encode of it (the outside reference: the same encoder run on that caption alone), for
FLUX.1 (T5 + CLIP, trimmed) and FLUX.2 (Qwen3, padded)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from encode_inputs import image_bytes
from typer.testing import CliRunner

from preprocess.captions import CaptionOptions, row_captions
from preprocess.cli import app
from preprocess.sources import read_captions
from shared.cache import CacheReader
from shared.cache.alt_captions import CAPTION_ALT, alt_name
from shared.cache.schema import arrow_schema
from train.data import CacheStream


def test_captions_are_read_one_a_line_or_from_a_json_list():
    assert read_captions({"txt": b"\xef\xbb\xbf a cat \r\n\n  a grey cat, sitting \n"}) == (
        ["a cat", "a grey cat, sitting"], None)
    assert read_captions({"caption": b"only one\n"}) == (["only one"], None)
    assert read_captions({"json": b'{"caption": [" x ", "", "y"]}'}) == (["x", "y"], None)
    assert read_captions({"json": b'{"caption": "one\\ntwo"}'}) == (["one\ntwo"], None)   # a string is one
    assert read_captions({"json": b'{"caption": ["x", 3]}'}) == (None, "no_caption")
    assert read_captions({"txt": b" \n \n"}) == (None, "empty_file")


def test_prefix_and_variants_shuffle_the_tags_after_the_first_or_the_prefix():
    caption = "sks dog, grass, sun, ball, tree"
    plain = row_captions([caption], "k", CaptionOptions(variants=6))
    assert plain[0] == caption and 1 < len(plain) <= 7 and len(set(plain)) == len(plain)
    tags = caption.split(", ")
    for v in plain[1:]:
        assert v.split(", ")[0] == "sks dog" and sorted(v.split(", ")) == sorted(tags)
    prefixed = row_captions([caption, "prose without tags"], "k", CaptionOptions(prefix=" ohwx ", variants=6))
    assert prefixed[:2] == ["ohwx, " + caption, "ohwx, prose without tags"]
    firsts = {v.split(", ")[1] for v in prefixed[2:]}
    assert all(v.startswith("ohwx, ") and sorted(v.split(", ")[1:]) == sorted(tags) for v in prefixed[2:])
    assert len(firsts) > 1    # with a prefix the first tag moves too
    assert row_captions([caption], "other key", CaptionOptions(variants=6)) != plain   # seeded by the key


def test_variants_are_the_same_in_another_process():
    """Seeded by the row's key alone: another interpreter (another hash seed) draws the same shuffles."""
    code = ("import json; from preprocess.captions import CaptionOptions, row_captions; "
            "print(json.dumps(row_captions(['a, b, c, d, e, f'], 'dir/key', CaptionOptions(variants=4))))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == row_captions(["a, b, c, d, e, f"], "dir/key", CaptionOptions(variants=4))


def _encode(model, folder, out, *extra):
    args = ["encode", "--model", str(model), "--input", str(folder), "--output", str(out), "--resolution", "32",
            "--num-workers", "0", "--device", "cpu", "--no-progress", *extra]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return CacheReader(out)


def _rows(reader: CacheReader) -> dict:
    return {k: (g, i) for s in reader.shards for g in reader.iter_shard(s) for i, k in enumerate(g["key"])}


def _columns(group: dict, i: int, spec, j: int | None) -> dict:
    """One caption's text columns: the row's first (j None) or its other caption j."""
    if j is None:
        return {c: group[c][i] for c in (*spec.tensor_columns, spec.length)}
    return {c: group[alt_name(c)][i][j] for c in (*spec.tensor_columns, spec.length)}


@pytest.mark.parametrize("family", ["flux1", "flux2"])
def test_each_caption_is_encoded_as_it_would_be_alone(family, tiny_model, tiny_flux2_klein, tmp_path):
    model, mode = (tiny_model, "trimmed") if family == "flux1" else (tiny_flux2_klein, "padded")
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name, color in (("a", (200, 30, 30)), ("b", (30, 200, 30)), ("c", (30, 30, 200))):
        (folder / f"{name}.png").write_bytes(image_bytes((40, 40), color, fmt="PNG"))
    (folder / "a.txt").write_text("a red square\nsquare, red, bright, flat, small\n\n")
    (folder / "b.json").write_text(json.dumps({"caption": ["green", "a green square on black"]}))
    (folder / "c.txt").write_text("a blue square\n")
    opts = CaptionOptions(variants=2)
    reader = _encode(model, folder, tmp_path / "multi", "--text-mode", mode, "--batch-size", "2",
                     "--caption-variants", "2")
    rows, spec = _rows(reader), reader.family.text
    expected = {k: row_captions(read_captions({f.suffix[1:]: f.read_bytes()})[0], k, opts)
                for k in "abc" for f in folder.glob(f"{k}.*") if f.suffix != ".png"}
    stored = {k: [g["caption"][i], *g[CAPTION_ALT][i]] for k, (g, i) in rows.items()}
    assert stored == expected and len(expected["a"]) == 4 and len(expected["c"]) == 1
    assert reader.manifest["captions"] == {"max": 4, "rows_with_several": 2, "total": 7, "prefix": "",
                                           "separator": ", ", "variants": 2}

    # The trainer's stream gives each sample one of its row's captions, as cached.
    batch = next(iter(CacheStream(tmp_path / "multi", batch_size=3, seed=0)))
    for b, key in enumerate(batch.key):
        g, i = rows[key]
        options = [_columns(g, i, spec, j) for j in (None, *range(len(g[CAPTION_ALT][i])))]
        n = int(batch.text_len[b])
        assert any(torch.equal(batch.text[b, :n], o[spec.states][:n]) for o in options), key

    # The reference: every caption on its own image file, encoded one at a time.
    alone = tmp_path / "alone"
    alone.mkdir()
    where = {}
    for k, captions in expected.items():
        for j, caption in enumerate(captions):
            (alone / f"{k}{j}.png").write_bytes((folder / f"{k}.png").read_bytes())
            (alone / f"{k}{j}.txt").write_text(caption)
            where[f"{k}{j}"] = (k, None if j == 0 else j - 1)
    single = _encode(model, alone, tmp_path / "single", "--text-mode", mode, "--batch-size", "1")
    for key, (g, i) in _rows(single).items():
        k, j = where[key]
        ours, ref = _columns(*rows[k], spec, j), _columns(g, i, spec, None)
        for c in (*spec.tensor_columns, spec.length):
            assert torch.equal(torch.as_tensor(ours[c]), torch.as_tensor(ref[c])), (key, c)
    for s in single.shards:   # a cache of one caption a row: the columns as before, nothing more said
        assert single.store.open_parquet(s).schema_arrow.remove_metadata().equals(arrow_schema(spec))
    assert "captions" not in single.manifest and "captions" not in json.loads(
        (tmp_path / "single/_progress/settings.json").read_text())

    planned = CliRunner().invoke(app, ["plan", "--model", str(model), "--input", str(folder), "--resolution", "32",
                                       "--text-mode", mode, "--caption-variants", "2", "--json"])
    assert planned.exit_code == 0, planned.output
    on_disk = sum(s["bytes"] for s in reader.manifest["shards"]) / reader.num_rows
    assert json.loads(planned.stdout)["bytes_per_sample"] == pytest.approx(on_disk, rel=0.02)
    shown = CliRunner().invoke(app, ["inspect", str(tmp_path / "multi")]).output
    assert "captions   up to 4 a row (2 rows with several, 7 in all); 2 tag-shuffled variants of each" in shown
    assert CliRunner().invoke(app, ["verify", str(tmp_path / "multi")]).exit_code == 0
