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
    """Flux2KleinPipeline(image=...): its preprocessing and normalised image latent (FLUX.2's to_x0 of ours)."""
    from diffusers import Flux2KleinPipeline
    reader = _encode(tiny_flux2_klein, _paired_tar(tmp_path / "d" / "a.tar", (96, 64)), tmp_path / "cache")
    [row] = _rows(reader).values()
    assert reader.manifest["references"] == 1 and reader.manifest["image"]["reference_resolution"] is None
    pipe = Flux2KleinPipeline.from_pretrained(str(tiny_flux2_klein))
    seen = _spy(pipe, stop=False)
    pipe(image=Image.open(io.BytesIO(_ref_png((96, 64)))), prompt="x", height=32, width=32, num_inference_steps=1,
         output_type="latent")
    ours = FLUX2.to_x0(row["ref0_latent"][None], reader.manifest["vae"])
    assert ours.shape == seen["latents"].shape
    torch.testing.assert_close(ours, seen["latents"].float(), atol=1e-4, rtol=1e-4)
