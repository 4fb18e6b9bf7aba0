"""A LoRA user's folder of captioned images: skipped files named where the counts are shown (manifest,
encode's summary, inspect, plan); captions as users save them (kohya's .caption and repeat folders, a
byte-order mark, two images of one name)."""
from __future__ import annotations

import json

from encode_inputs import image_bytes
from typer.testing import CliRunner

from preprocess.cli import app
from shared.cache import CacheReader


def _args(command, model, folder, out, *extra):
    return [command, "--model", str(model), "--input", str(folder), "--output", str(out), "--resolution", "32",
            "--t5-mode", "trimmed", "--batch-size", "4", "--num-workers", "0", "--device", "cpu", "--no-progress",
            *extra]


def test_skipped_files_are_named_in_the_manifest_encode_inspect_and_plan(tiny_model, tmp_path):
    folder = tmp_path / "my-images"
    (folder / "sub").mkdir(parents=True)
    for name in ("a", "sub/b"):
        (folder / f"{name}.jpg").write_bytes(image_bytes((40, 40)))
        (folder / f"{name}.txt").write_text(f"a photo {name}")
    (folder / "broken.jpg").write_bytes(b"not a jpeg at all" * 10)
    (folder / "broken.txt").write_text("a broken file")
    (folder / "tiny.jpg").write_bytes(image_bytes((8, 8)))
    (folder / "tiny.txt").write_text("an icon")
    for i in range(22):                                    # more than are named
        (folder / f"nocap{i:02d}.png").write_bytes(image_bytes((40, 40), fmt="PNG"))
    nocap = [f"nocap{i:02d} (png)" for i in range(20)]

    encoded = CliRunner().invoke(app, _args("encode", tiny_model, folder, tmp_path / "c"))
    assert encoded.exit_code == 0, encoded.output
    m = CacheReader(tmp_path / "c").manifest
    assert m["skipped"] == {"bad_image": 1, "no_caption": 22, "too_small": 1}
    assert m["skipped_examples"] == {"bad_image": ["broken (jpg, txt)"], "no_caption": nocap,
                                     "too_small": ["tiny (jpg, txt)"]}
    assert "  bad_image 1: broken (jpg, txt)" in encoded.output
    assert f"  no_caption 22 (the first 20 named): {', '.join(nocap)}" in encoded.output

    inspected = CliRunner().invoke(app, ["inspect", str(tmp_path / "c")])
    assert f"  too_small              1: tiny (jpg, txt)" in inspected.output
    assert f"  no_caption             22 (the first 20 named): {nocap[0]}, " in inspected.output

    planned = CliRunner().invoke(app, _args("plan", tiny_model, folder, tmp_path / "p"))
    assert planned.exit_code == 0, planned.output
    assert "  bad_image 1: broken (jpg, txt)" in planned.output and "  too_small 1: tiny (jpg, txt)" in planned.output
    as_json = json.loads(CliRunner().invoke(app, _args("plan", tiny_model, folder, tmp_path / "p", "--json")).stdout)
    assert as_json["skipped_examples"] == m["skipped_examples"]


def test_a_kohya_folder_is_read_and_its_repeat_counts_said_to_be_ignored(tiny_model, tmp_path):
    dog = tmp_path / "train" / "10_dog"
    dog.mkdir(parents=True)
    (dog / "x.png").write_bytes(image_bytes((40, 40), fmt="PNG"))
    (dog / "x.caption").write_bytes(b"\xef\xbb\xbfa photo of sks dog")    # kohya's extension, Notepad's BOM
    (dog / "y.jpg").write_bytes(image_bytes((40, 40)))
    (dog / "y.png").write_bytes(image_bytes((40, 40), fmt="PNG"))
    (dog / "y.txt").write_text("which image?")
    encoded = CliRunner().invoke(app, _args("encode", tiny_model, tmp_path / "train", tmp_path / "c"))
    assert encoded.exit_code == 0, encoded.output
    assert f"warning: {dog} (10 repeats): named as kohya repeat folders" in encoded.output
    assert "repeat counts are ignored" in encoded.output
    reader = CacheReader(tmp_path / "c")
    captions = {k: c for s in reader.shards for g in reader.iter_shard(s) for k, c in zip(g["key"], g["caption"])}
    assert captions == {"10_dog/x": "a photo of sks dog"}
    assert reader.manifest["skipped_examples"] == {"same_stem": ["10_dog/y (jpg, png, txt)"]}
    assert "  same_stem 1: 10_dog/y (jpg, png, txt)" in encoded.output
