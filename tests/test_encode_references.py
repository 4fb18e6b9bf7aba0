"""Paired data (issue 27, encode side): reference images into the cache, checked against diffusers' edit
pipelines (FluxKontextPipeline built from the tiny FLUX.1 folder's parts, Flux2KleinPipeline from the tiny
klein folder): their own preprocessing and _encode_vae_image, run on the same image."""
from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from preprocess.decode import PrepOptions
from preprocess.encode import EncodeOptions
from preprocess.encode_run import run_encode
from preprocess.images import to_model_range
from preprocess.references import prepare_reference
from shared.cache import CacheReader
from shared.family.flux1 import FLUX1
from shared.family.flux2 import FLUX2
from tests.encode_inputs import image_bytes, write_tar


class _Stop(Exception):
    pass


def _spy(pipe, stop: bool):
    """Record what the pipeline's own _encode_vae_image takes and returns (its preprocessing's output and the
    pipeline's latents); `stop`: end the call there (only the preprocessing is wanted)."""
    seen, original = {}, pipe._encode_vae_image

    def spy(image, generator):
        seen["image"] = image.detach().clone()
        if stop:
            raise _Stop
        seen["latents"] = original(image=image, generator=generator)
        return seen["latents"]
    pipe._encode_vae_image = spy
    return seen


def _encode(model, data, out, references=1, resolution=None, **prep):
    run_encode(str(model), str(data), out, prep=PrepOptions(resolution=32, references=references,
                                                            reference_resolution=resolution, **prep),
               opts=EncodeOptions(dtype="fp32"), batch_size=4, num_workers=0, device="cpu", progress=False)
    return CacheReader(out)


def _rows(reader) -> dict:
    rows = {}
    for shard in reader.shards:
        for g in reader.iter_shard(shard):
            for i, key in enumerate(g["key"]):
                rows[key] = {k: v[i] for k, v in g.items() if v is not None}
    return rows


def _ref_png(size, color=(30, 90, 200)) -> bytes:
    """A reference with some detail (a gradient), so that resizing filters differ visibly."""
    img = Image.new("RGB", size, color)
    for x in range(size[0]):
        for y in range(0, size[1], 3):
            img.putpixel((x, y), ((x * 7) % 256, (y * 11) % 256, 128))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _paired_tar(path, ref_size=(48, 32)):
    return write_tar(path, [("s0.jpg", image_bytes((48, 40))), ("s0.txt", b"make it blue"),
                            ("s0.ref.png", _ref_png(ref_size))])


def test_kontext_reference_sizes_and_pixels_are_the_pipelines(tiny_model):
    """FluxKontextPipeline's _auto_resize (preferred resolution by aspect, Lanczos): the same pixels."""
    from diffusers import FluxKontextPipeline
    pipe = FluxKontextPipeline.from_pretrained(str(tiny_model))
    for size in ((48, 32), (32, 80), (64, 64)):
        seen = _spy(pipe, stop=True)
        with pytest.raises(_Stop):
            pipe(image=Image.open(io.BytesIO(_ref_png(size))), prompt="x", height=32, width=32, max_area=32 * 32,
                 num_inference_steps=1, output_type="latent")
        ours = prepare_reference(_ref_png(size), FLUX1, 1)
        assert tuple(seen["image"].shape[2:]) == tuple(ours.pixels.shape[1:]), size
        assert (ours.width, ours.height) == size
        torch.testing.assert_close(to_model_range(ours.pixels)[None], seen["image"].float(), atol=1e-5, rtol=0)


def test_kontext_reference_latent_is_the_pipelines(tiny_model, tmp_path):
    """The cached reference latent, through FLUX.1's to_x0, is FluxKontextPipeline's image latent (a reference
    of 16-multiple sides kept at its size: _auto_resize off there, --reference-resolution here)."""
    from diffusers import FluxKontextPipeline
    reader = _encode(tiny_model, _paired_tar(tmp_path / "d" / "a.tar"), tmp_path / "cache", resolution=64)
    [row] = _rows(reader).values()
    pipe = FluxKontextPipeline.from_pretrained(str(tiny_model))
    seen = _spy(pipe, stop=False)
    pipe(image=Image.open(io.BytesIO(_ref_png((48, 32)))), prompt="x", height=32, width=32, max_area=32 * 32,
         num_inference_steps=1, output_type="latent", _auto_resize=False)
    assert (int(row["ref0_width"]), int(row["ref0_height"])) == (48, 32)
    ours = FLUX1.to_x0(row["ref0_latent"][None], reader.manifest["vae"])
    torch.testing.assert_close(ours, seen["latents"].float(), atol=1e-4, rtol=1e-4)


def test_klein_reference_latent_is_the_pipelines(tiny_flux2_klein, tmp_path):
    """Flux2KleinPipeline(image=...): its preprocessing and normalised image latent (FLUX.2's to_x0 of ours), for
    a reference of no 16-multiple sides (the pipeline crops 90x70 to 80x64, centred)."""
    from diffusers import Flux2KleinPipeline
    reader = _encode(tiny_flux2_klein, _paired_tar(tmp_path / "d" / "a.tar", (90, 70)), tmp_path / "cache")
    [row] = _rows(reader).values()
    assert reader.manifest["references"] == 1 and reader.manifest["image"]["reference_resolution"] is None
    pipe = Flux2KleinPipeline.from_pretrained(str(tiny_flux2_klein))
    seen = _spy(pipe, stop=False)
    pipe(image=Image.open(io.BytesIO(_ref_png((90, 70)))), prompt="x", height=32, width=32, num_inference_steps=1,
         output_type="latent")
    ours = FLUX2.to_x0(row["ref0_latent"][None], reader.manifest["vae"])
    assert ours.shape == seen["latents"].shape
    torch.testing.assert_close(ours, seen["latents"].float(), atol=1e-4, rtol=1e-4)


def _paired_samples():
    """(stem, target, caption, reference or None): two good, one whose reference is missing, one unreadable."""
    return [("s0", image_bytes((48, 40), (200, 30, 30)), b"make it blue", _ref_png((64, 32))),
            ("s1", image_bytes((40, 56), (30, 200, 30)), b"make it red", _ref_png((32, 48), (250, 10, 10))),
            ("s8", image_bytes(), b"no reference", None),
            ("s9", image_bytes(), b"a broken reference", b"not an image")]


def test_folder_and_tar_give_the_same_rows_and_count_bad_references(tiny_model, tmp_path, s3_bucket):
    """A folder with control/ (and reference0/) and a tar with KEY.ref.png / KEY.ref0.png encode to the same rows,
    and the tar into an object store too; a missing and an unreadable reference are skipped by reason; plan's
    estimate is within a few % of the written bytes; inspect shows the references and verify checks them."""
    from preprocess.inspect_cache import inspect_cache
    from preprocess.plan import plan
    from preprocess.verify import verify_cache
    folder, members = tmp_path / "folder", []
    for i, (stem, target, caption, ref) in enumerate(_paired_samples()):
        members += [(f"{stem}.jpg", target), (f"{stem}.txt", caption)]
        (folder / "control").mkdir(parents=True, exist_ok=True)
        (folder / f"{stem}.jpg").write_bytes(target)
        (folder / f"{stem}.txt").write_bytes(caption)
        if ref is not None:
            ref_name = "ref0" if i == 1 else "ref"
            members.append((f"{stem}.{ref_name}.png", ref))
            sub = folder / ("reference0" if i == 1 else "control")
            sub.mkdir(exist_ok=True)
            (sub / f"{stem}.png").write_bytes(ref)
    tar = write_tar(tmp_path / "tars" / "a.tar", members)
    from_tar = _encode(tiny_model, tar, tmp_path / "c_tar", resolution=32)
    from_folder = _encode(tiny_model, folder, tmp_path / "c_folder", resolution=32)
    rows_tar = {k.rpartition("/")[2]: v for k, v in _rows(from_tar).items()}
    rows_folder = _rows(from_folder)
    assert sorted(rows_tar) == sorted(rows_folder) == ["s0", "s1"]
    for key, row in rows_tar.items():
        assert row.keys() == rows_folder[key].keys() and "ref0_latent" in row
        for col, value in row.items():
            if col != "key":
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(rows_folder[key][col])) \
                    if not isinstance(value, str) else value == rows_folder[key][col], (key, col)
    assert (int(rows_tar["s1"]["ref0_width"]), int(rows_tar["s1"]["ref0_height"])) == (32, 48)
    for cache in (from_tar, from_folder):
        assert cache.manifest["skipped"] == {"bad_reference": 1, "missing_reference": 1}
        assert cache.manifest["references"] == 1 and cache.manifest["image"]["reference_resolution"] == 32
    assert from_tar.manifest["skipped_examples"]["missing_reference"] == ["tars/a/s8 (jpg, txt)"]

    estimate = plan(str(tiny_model), str(tar), PrepOptions(resolution=32, references=1, reference_resolution=32),
                    text_mode="padded", text_max_length=None, dtype="fp32", store_logvar=False, rows_per_shard=1000)
    written = sum(s["bytes"] for s in from_tar.manifest["shards"])
    assert estimate["rows"] == 2 and estimate["skipped"] == from_tar.manifest["skipped"]
    assert abs(estimate["total_bytes"] / written - 1) < 0.03, (estimate["total_bytes"], written)
    shown = inspect_cache(tmp_path / "c_tar")
    assert "references 1 a row" in shown and "ref0_latent" in shown and "ref0 latent sizes" in shown
    assert verify_cache(tmp_path / "c_tar") == []
    remote = _encode(tiny_model, tar, f"{s3_bucket}/cache", resolution=32)
    rows_remote = _rows(remote)
    assert rows_remote.keys() == _rows(from_tar).keys()
    for key, row in rows_remote.items():
        assert torch.equal(row["ref0_latent"], _rows(from_tar)[key]["ref0_latent"])
    assert verify_cache(f"{s3_bucket}/cache") == []


def test_kill_9_during_a_paired_encode_then_rerun_gives_the_clean_rows(tiny_model, tmp_path):
    """test_encode_resume's kill -9 and rerun, on paired data: exactly the clean run's rows, refs included."""
    from tests.test_encode_resume import encode_args, kill_encode_after_two_inputs, raw_rows, run_cli
    data = tmp_path / "data"
    for t in range(20):
        write_tar(data / f"demo-{t:05d}.tar",
                  [m for i in range(4) for m in ((f"k{i}.jpg", image_bytes((48, 40), (8 * t, 40 * i, 90))),
                                                 (f"k{i}.txt", f"shard {t} sample {i}".encode()),
                                                 (f"k{i}.ref.png", _ref_png((32 + 16 * (i % 2), 32), (9 * t, 0, 0))))])
    def args(out):
        return encode_args(tiny_model, data, out, "--references", "1", "--reference-resolution", "48")
    clean = tmp_path / "clean"
    run_cli(args(clean))
    out, done_dir = tmp_path / "cache", tmp_path / "cache" / "_progress" / "done"
    kill_encode_after_two_inputs(args(out), done_dir)
    records = sorted(done_dir.glob("*.json"))
    assert 2 <= len(records) < 20
    records[-1].unlink()     # the narrowest window: output shards in place, done-record not yet written
    assert "were done" in run_cli(args(out)).stdout
    rows = raw_rows(out)
    assert rows == raw_rows(clean) and len(rows) == 80
    assert {r["ref0_w"] for r in rows.values()} == {4, 6}     # two reference sizes: 32 and 48 px, VAE factor 8


def test_flux2_reference_caps_are_the_pipelines_resize():
    """Several references: each capped at 1024^2 by Flux2ImageProcessor._resize_to_target_area (diffusers'),
    then floored to multiples of 16; one reference: BFL's 2024^2 cap; --reference-resolution: its square."""
    from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor
    for size in ((3000, 2000), (1500, 900), (700, 500)):
        img = Image.new("RGB", size)
        capped = Flux2ImageProcessor._resize_if_exceeds_area(img, 1024 * 1024).size
        assert FLUX2.reference_size(*size, count=2) == tuple(x // 16 * 16 for x in capped)
        capped = Flux2ImageProcessor._resize_if_exceeds_area(img, 2024 * 2024).size
        assert FLUX2.reference_size(*size, count=1) == tuple(x // 16 * 16 for x in capped)
        capped = Flux2ImageProcessor._resize_if_exceeds_area(img, 512 * 512).size
        assert FLUX2.reference_size(*size, count=1, override=512) == tuple(x // 16 * 16 for x in capped)
    assert FLUX2.reference_size(48, 300, count=1) == (0, 0)     # under 64 pixels: the pipelines refuse it


def test_two_references_for_flux1_are_refused_before_any_work(tiny_model, tmp_path):
    """FLUX.1 (Kontext) places one reference: --references 2 is refused naming the option and the family, and
    nothing is written."""
    with pytest.raises(ValueError, match="--references.*flux1 places at most 1"):
        _encode(tiny_model, _paired_tar(tmp_path / "d" / "a.tar"), tmp_path / "cache", references=2)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_masks_and_references_in_one_folder_encode_together(tiny_model, tmp_path):
    """encode --masks --references 1 on a folder with masks/ and control/ beside the images: every row holds its
    mask and its reference, verify passes; a changed reference changes its input shard's fingerprint (as a
    changed mask does), so a resumed encode does it again."""
    from preprocess.sources import resolve_inputs
    from preprocess.verify import verify_cache
    folder = tmp_path / "pairs"
    for sub in ("masks", "control"):
        (folder / sub).mkdir(parents=True)
    for stem, ref in (("a", _ref_png((48, 32))), ("b", _ref_png((32, 48), (250, 10, 10)))):
        (folder / f"{stem}.jpg").write_bytes(image_bytes((48, 40)))
        (folder / f"{stem}.txt").write_bytes(b"make it blue")
        (folder / "masks" / f"{stem}.png").write_bytes(image_bytes((48, 40), (255, 255, 255), fmt="PNG"))
        (folder / "control" / f"{stem}.png").write_bytes(ref)
    reader = _encode(tiny_model, folder, tmp_path / "cache", resolution=32, masks=True)
    rows = _rows(reader)
    assert sorted(rows) == ["a", "b"] and reader.manifest["skipped"] == {}
    for row in rows.values():
        assert row["mask"].shape == row["latent"].shape[1:] and row["ref0_latent"].ndim == 3
    assert verify_cache(tmp_path / "cache") == []
    before = resolve_inputs(str(folder), references=1)[0].fingerprint
    (folder / "control" / "a.png").write_bytes(_ref_png((48, 32), (10, 200, 10)))
    assert resolve_inputs(str(folder), references=1)[0].fingerprint != before
