"""flux-sample --image (edit models) against diffusers' own pipelines on the tiny folders: FluxKontextPipeline
(tiny Kontext folder) and Flux2KleinPipeline(image=...) (tiny [klein] folder), the same prompt, seed, steps
and guidance, within 1/255 mean, with and without a LoRA; and the refusals."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from sample.cli import app as sample_app

PROMPT = "a red circle on a black background"
SIZE, STEPS, SEED = 64, 3, 0
PNG = "0000-a-red-circle-on-a-black-background-seed0.png"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A 90x70 picture: no multiple of 16, so Flux2KleinPipeline crops it to 80x64 and FluxKontextPipeline
    resizes it to its preferred resolution; flux-sample must do the same by the family's rule."""
    rng = np.random.default_rng(0)
    pixels = np.zeros((70, 90, 3), np.uint8)
    pixels[8:40, 16:60] = (200, 40, 30)
    pixels = np.clip(pixels.astype(int) + rng.integers(0, 40, pixels.shape), 0, 255).astype(np.uint8)
    path = tmp_path_factory.mktemp("ref") / "ref.png"
    Image.fromarray(pixels).save(path)
    return path


# FluxKontextPipeline as flux-sample runs the tiny folder: the image at 64x64 (max_area), the tiny T5's 32
# tokens, Kontext's guidance; the reference auto-resized (Kontext's preferred resolutions), or with
# --reference-size 80x64 resized to that (_auto_resize off: the pipeline resizes to the image's own 80x64 sides)
KONTEXT = {"guidance_scale": 2.5, "max_area": SIZE * SIZE, "max_sequence_length": 32}
EXPLICIT = ("--reference-size", "80x64")


def random_lora(model_folder, pipeline_cls, out):
    """An adapter of random, non-zero weights on the folder's transformer, saved as the pipeline saves one."""
    from peft import LoraConfig, get_peft_model_state_dict
    from shared.family import family_of_model, load_transformer
    transformer = load_transformer(str(model_folder))
    torch.manual_seed(1)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                       target_modules=family_of_model(str(model_folder)).default_lora_targets))
    pipeline_cls.save_lora_weights(str(out), transformer_lora_layers=get_peft_model_state_dict(transformer))
    return out


def flux_sample(out, model, ref, *extra):
    r = CliRunner().invoke(sample_app, [str(a) for a in (
        "--model", model, "--prompt", PROMPT, "--output", out, "--steps", STEPS, "--width", SIZE, "--height", SIZE,
        "--image", ref, "--no-progress", *extra)])
    assert r.exit_code == 0, r.output + repr(r.exception)
    return np.asarray(Image.open(out / PNG)).astype(np.int16)


def pipeline_image(pipe, ref, **kw) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    image = pipe(prompt=PROMPT, image=Image.open(ref).convert("RGB"), height=SIZE, width=SIZE,
                 num_inference_steps=STEPS, output_type="np", generator=torch.Generator().manual_seed(SEED),
                 **kw).images[0]
    return np.round(image * 255).astype(np.int16)


def test_kontext_samples_as_flux_kontext_pipeline_with_and_without_a_lora(tiny_kontext, reference, tmp_path):
    from diffusers import FluxKontextPipeline
    pipe = FluxKontextPipeline.from_pretrained(str(tiny_kontext))
    ours = flux_sample(tmp_path / "base", tiny_kontext, reference)     # Kontext's guidance 2.5 by default
    assert np.abs(ours - pipeline_image(pipe, reference, **KONTEXT)).mean() <= 1
    explicit = flux_sample(tmp_path / "explicit", tiny_kontext, reference, *EXPLICIT, "--guidance", 2.5)
    assert np.abs(explicit - pipeline_image(pipe, reference, _auto_resize=False, **KONTEXT)).mean() <= 1
    lora = random_lora(tiny_kontext, FluxKontextPipeline, tmp_path / "lora")
    ours_lora = flux_sample(tmp_path / "with-lora", tiny_kontext, reference, *EXPLICIT, "--lora", lora)
    pipe.load_lora_weights(str(lora))
    assert np.abs(ours_lora - pipeline_image(pipe, reference, _auto_resize=False, **KONTEXT)).mean() <= 1
    assert np.abs(ours_lora - explicit).mean() > 1      # the adapter changed the image: the comparison can fail


def test_klein_samples_as_flux2_klein_pipeline_with_a_reference_with_and_without_a_lora(tiny_flux2_klein,
                                                                                        reference, tmp_path):
    from diffusers import Flux2KleinPipeline
    pipe = Flux2KleinPipeline.from_pretrained(str(tiny_flux2_klein))
    ours = flux_sample(tmp_path / "base", tiny_flux2_klein, reference)    # klein base: CFG 4, refs in both passes
    assert np.abs(ours - pipeline_image(pipe, reference, guidance_scale=4.0)).mean() <= 1
    lora = random_lora(tiny_flux2_klein, Flux2KleinPipeline, tmp_path / "lora")
    ours_lora = flux_sample(tmp_path / "with-lora", tiny_flux2_klein, reference, "--lora", lora)
    pipe.load_lora_weights(str(lora))
    assert np.abs(ours_lora - pipeline_image(pipe, reference, guidance_scale=4.0)).mean() <= 1
    assert np.abs(ours_lora - ours).mean() > 1


@pytest.mark.parametrize("family", ["kontext", "klein"])
def test_sample_references_are_the_pipelines_pixels(family, tiny_kontext, tiny_flux2_klein, reference):
    """flux-sample's prepared --image (the family's rule, shared with encode) is what the pipeline hands its
    _encode_vae_image: Kontext's preferred resolution, [klein]'s centre crop to 80x64. (The tiny [klein]
    transformer barely reacts to its reference, so the images above alone could not show this.)"""
    from diffusers import Flux2KleinPipeline, FluxKontextPipeline
    from diffusers.image_processor import VaeImageProcessor
    from sample.references import reference_images
    from shared.family import family_of_model
    folder, cls = (tiny_kontext, FluxKontextPipeline) if family == "kontext" else (tiny_flux2_klein,
                                                                                    Flux2KleinPipeline)
    pipe, seen = cls.from_pretrained(str(folder)), {}

    def spy(image, generator):
        seen["image"] = image
        raise KeyboardInterrupt    # only the preprocessing is wanted
    pipe._encode_vae_image = spy
    with pytest.raises(KeyboardInterrupt):
        pipe(prompt=PROMPT, image=Image.open(reference).convert("RGB"), height=SIZE, width=SIZE,
             num_inference_steps=1, output_type="latent")
    [ours] = reference_images(family_of_model(str(folder)), [reference])
    pixels = VaeImageProcessor(vae_scale_factor=16).preprocess(ours, height=ours.height, width=ours.width)
    assert pixels.shape == seen["image"].shape and ours.size != (90, 70)
    torch.testing.assert_close(pixels, seen["image"].float(), atol=1e-5, rtol=0)


def test_kontext_refuses_a_second_reference_and_a_size_without_an_image(tiny_kontext, reference, tmp_path):
    runner = CliRunner()
    base = ["--model", str(tiny_kontext), "--prompt", PROMPT, "--output", str(tmp_path), "--no-progress"]
    r = runner.invoke(sample_app, base + ["--image", str(reference), "--image", str(reference)])
    assert r.exit_code == 2 and "flux1-kontext places at most 1" in r.output
    r = runner.invoke(sample_app, base + ["--reference-size", "64x48"])
    assert r.exit_code == 2 and "--reference-size" in r.output
