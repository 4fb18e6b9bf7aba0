"""Input specs, raw samples and skip counting, without any model."""
from __future__ import annotations

import pytest
from encode_inputs import (BAD_EXPECTED_SKIPS, BAD_GOOD_KEYS, bad_members, good_members, image_bytes,
                           truncated_tar, write_tar)

from preprocess.decode import PrepOptions, shard_batches
from preprocess.sources import (InputError, RawSample, Skip, iter_shard, read_caption, repeat_folder_warning,
                                resolve_inputs)


def _run_shard(shard, **opts):
    keys, skips, ends = [], {}, 0
    for b in shard_batches(shard, PrepOptions(**opts), batch_size=3):
        keys += b["keys"]
        for r, n in b["skips"].items():
            skips[r] = skips.get(r, 0) + n
        ends += b["end"]
    assert ends == 1
    return keys, skips


def test_bad_inputs_are_skipped_and_counted_by_reason(tmp_path):
    write_tar(tmp_path / "bad-00000.tar", bad_members())
    [shard] = resolve_inputs(str(tmp_path / "bad-00000.tar"))
    keys, skips = _run_shard(shard, resolution=32, min_size=16)
    assert set(keys) == {f"{tmp_path.name}/bad-00000/{k}" for k in BAD_GOOD_KEYS}
    assert skips == BAD_EXPECTED_SKIPS


def test_truncated_tar_keeps_complete_samples(tmp_path):
    path = truncated_tar(tmp_path / "cut-00000.tar", n_complete=5)
    [shard] = resolve_inputs(str(path))
    keys, skips = _run_shard(shard, resolution=32)
    assert keys == [f"{tmp_path.name}/cut-00000/cut{i:04d}" for i in range(5)]
    assert skips == {"truncated_tar": 1}


def test_not_a_tar_is_one_counted_skip(tmp_path):
    (tmp_path / "junk.tar").write_bytes(b"\x00\x01garbage" * 100)
    [shard] = resolve_inputs(str(tmp_path / "junk.tar"))
    items = list(iter_shard(shard))
    assert len(items) == 1 and isinstance(items[0], Skip)


def test_input_specs_brace_glob_list_and_missing(tmp_path):
    for i in range(3):
        write_tar(tmp_path / f"x-{i:05d}.tar", good_members(f"s{i}_", 1))
    brace = resolve_inputs(str(tmp_path / "x-{00000..00002}.tar"))
    glob = resolve_inputs(str(tmp_path / "x-*.tar"))
    ids = [f"{tmp_path.name}_x-{i:05d}" for i in range(3)]
    assert [s.id for s in brace] == [s.id for s in glob] == ids
    folder = resolve_inputs(str(tmp_path))   # a folder of tar shards means its shards
    assert [(s.id, s.url, s.files) for s in folder] == [(s.id, s.url, s.files) for s in glob]
    joined = resolve_inputs(f"{tmp_path / 'x-00000.tar'}::{tmp_path / 'x-00002.tar'}")
    assert [s.id for s in joined] == [ids[0], ids[2]]
    with pytest.raises(InputError, match="names .* twice"):
        resolve_inputs(f"{tmp_path / 'x-00000.tar'}::{tmp_path / 'x-00000.tar'}")
    with pytest.raises(InputError):
        resolve_inputs(str(tmp_path / "x-{00000..00003}.tar"))
    with pytest.raises(InputError):
        resolve_inputs(str(tmp_path / "y-*.tar"))


def test_a_shards_identity_is_its_own_not_the_specs_or_the_typed_path(tmp_path, monkeypatch):
    """The id, key prefix and fingerprint of a/x-00000.tar are the same alone, beside b/x-00000.tar, and
    typed relative or absolute; two img2dataset-like folders' same-named tars are two shards."""
    for folder, n in (("a", 2), ("b", 3)):
        write_tar(tmp_path / folder / "x-00000.tar", good_members("s", n))
    alone = resolve_inputs(str(tmp_path / "a/x-00000.tar"))
    both = resolve_inputs(f"{tmp_path / 'a/x-00000.tar'}::{tmp_path / 'b/x-00000.tar'}")
    monkeypatch.chdir(tmp_path / "a")
    relative = resolve_inputs("x-00000.tar")
    identity = [(s.id, s.namespace, s.fingerprint) for s in alone]
    assert identity == [(s.id, s.namespace, s.fingerprint) for s in both[:1]]
    assert identity == [(s.id, s.namespace, s.fingerprint) for s in relative]
    assert [s.id for s in both] == ["a_x-00000", "b_x-00000"]
    assert both[0].row_key("s0000") != both[1].row_key("s0000")
    write_tar(tmp_path / "c/a/x-00000.tar", good_members("s", 1))   # another folder named a
    with pytest.raises(InputError, match="c/a/x-00000.tar would be the same input shard"):
        resolve_inputs(f"{tmp_path / 'a/x-00000.tar'}::{tmp_path / 'c/a/x-00000.tar'}")


def test_an_empty_tar_is_one_counted_skip(tmp_path):
    path = write_tar(tmp_path / "empty.tar", [])
    [shard] = resolve_inputs(str(path))
    assert [s.reason for s in iter_shard(shard)] == ["empty_shard"]


def test_folder_of_images_with_sidecar_captions(tmp_path):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for name in ("b", "a", "sub/c"):
        (folder / f"{name}.jpg").write_bytes(image_bytes((40, 40)))
        (folder / f"{name}.txt").write_text(f"caption {name}")
    (folder / "lonely.png").write_bytes(image_bytes((40, 40), fmt="PNG"))
    shards = resolve_inputs(str(folder), folder_shard_samples=2)
    assert [len(s.files) for s in shards] == [2, 2]
    keys, skips = [], {}
    for s in shards:
        k, sk = _run_shard(s, resolution=32)
        keys += k
        skips.update(sk)
    assert sorted(keys) == ["a", "b", "sub/c"]
    assert skips == {"no_caption": 1}


def test_caption_sources():
    assert read_caption({"txt": b" hi \n", "json": b'{"caption": "no"}'}) == ("hi", None)
    assert read_caption({"json": b'{"caption": "from json"}'}) == ("from json", None)
    assert read_caption({"json": b'{"url": "x"}'}) == (None, "no_caption")
    assert read_caption({"txt": b"\xff\xfe bad"}) == (None, "bad_caption_encoding")
    assert read_caption({"txt": b"  \n", "json": b'{"caption": "no"}'}) == (None, "empty_file")   # .txt decides
    assert read_caption({"json": b'{"caption": "   "}'}) == (None, "no_caption")
    assert read_caption({"json": b'["a list"]'}) == (None, "no_caption")
    # Each sample gets its own files (a shared default dict would carry one sample's files into the next).
    a, b = RawSample("a"), RawSample("b")
    a.files["txt"] = b"x"
    assert b.files == {}


def test_a_tar_cut_inside_a_samples_caption_skips_that_sample_only(tmp_path):
    """The cut falls in the second member of a sample: the samples before it are read whole, the one
    being read is one truncated_tar skip (webdataset reads the members; the handler counts the cut)."""
    import tarfile
    path = write_tar(tmp_path / "cut-00000.tar", good_members("cut", 6))
    with tarfile.open(path) as tar:
        target = tar.getmember("cut0003.txt")
        cut_at = target.offset_data + target.size // 2
    path.write_bytes(path.read_bytes()[:cut_at])
    [shard] = resolve_inputs(str(path))
    items = list(iter_shard(shard))
    assert [i.key for i in items if isinstance(i, RawSample)] == ["cut0000", "cut0001", "cut0002"]
    assert [(i.key, i.reason) for i in items if isinstance(i, Skip)] == [("cut0003", "truncated_tar")]
    assert all(set(i.files) == {"jpg", "txt"} for i in items if isinstance(i, RawSample))


BOM = b"\xef\xbb\xbf"


def test_captions_as_users_save_them():
    """A byte-order mark (Windows Notepad) is not caption text; kohya's .caption is read; .txt, then
    .caption, then .json's caption field."""
    assert read_caption({"txt": BOM + "a café".encode()}) == ("a café", None)
    assert read_caption({"caption": BOM + b"a kohya caption\n"}) == ("a kohya caption", None)
    assert read_caption({"json": BOM + b'{"caption": "from json"}'}) == ("from json", None)
    assert read_caption({"txt": BOM + b" \n"}) == (None, "empty_file")
    assert read_caption({"caption": b"second", "json": b'{"caption": "third"}'}) == ("second", None)
    assert read_caption({"txt": b"first", "caption": b"second"}) == ("first", None)


def test_a_folder_as_users_save_it(tmp_path):
    """.caption files, a BOM, dots in a file name, and img.png beside img.jpg: both skipped as same_stem
    (they used to become one sample, the .jpg, without a word)."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(image_bytes((40, 40)))
    (folder / "a.caption").write_bytes(b"kohya caption")
    (folder / "b.png").write_bytes(image_bytes((40, 40), fmt="PNG"))
    (folder / "b.txt").write_bytes(BOM + b"notepad caption")
    (folder / "photo.v2.jpg").write_bytes(image_bytes((40, 40)))
    (folder / "photo.v2.txt").write_text("a dotted name")
    (folder / "img001.jpg").write_bytes(image_bytes((40, 40)))
    (folder / "img001.png").write_bytes(image_bytes((40, 40), fmt="PNG"))
    (folder / "img001.txt").write_text("which one?")
    [shard] = resolve_inputs(str(folder))
    captions, skips, named = {}, {}, {}
    for b in shard_batches(shard, PrepOptions(resolution=32), batch_size=3):
        captions.update(zip(b["keys"], b["captions"]))
        for reason, n in b["skips"].items():
            skips[reason] = skips.get(reason, 0) + n
        named.update(b["skip_examples"])
    assert captions == {"a": "kohya caption", "b": "notepad caption", "photo.v2": "a dotted name"}
    assert skips == {"same_stem": 1} and named == {"same_stem": ["img001 (jpg, png, txt)"]}


def test_kohya_repeat_folders_are_named_as_ignored(tmp_path):
    for sub in ("10_dog", "3_cat", "other"):
        (tmp_path / "train" / sub).mkdir(parents=True)
    warning = repeat_folder_warning(str(tmp_path / "train"))
    assert f"{tmp_path / 'train/10_dog'} (10 repeats), {tmp_path / 'train/3_cat'} (3 repeats): named as kohya" \
        in warning
    assert "repeat counts are ignored" in warning and "other" not in warning
    assert "10_dog (10 repeats): named as kohya" in repeat_folder_warning(str(tmp_path / "train/10_dog"))  # itself
    assert repeat_folder_warning(str(tmp_path / "train/other")) is None
