"""FLUX.2 through every stage on the tiny [klein] and [dev] folders (CPU), each checked against diffusers'
own pipelines: encode's text and latents, flux-sample's images with and without a LoRA, the trainer's step
against a hand-written reference, the LoRA and full-weight exports loaded back; and the refusals."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flux2_runs import PNG, SIZE, STEPS, flux_sample, invoke, pipeline_image, train
from PIL import Image
from typer.testing import CliRunner
from train_caches import read_metrics, write_cache

from preprocess.cli import app as prep_app
from shared.cache import CacheReader
from shared.family import FLUX2


@pytest.fixture(scope="module")
def klein_lora(tiny_flux2_klein, klein_cache, tmp_path_factory):
    """A LoRA of the [klein] base, 3 steps, the last one rendering the sample prompt."""
    return train(tmp_path_factory.mktemp("lora") / "run", tiny_flux2_klein, klein_cache, "--lora.rank", 4,
                 "--run.max_steps", 3, "--run.sample_every", 3, "--run.sample_steps", STEPS, "--optim.lr", "0.1")


def test_encode_gives_the_pipelines_text_and_latents(tiny_flux2_klein, klein_cache):
    from diffusers import Flux2KleinPipeline

    from preprocess.images import prepare_image, to_model_range
    pipe = Flux2KleinPipeline.from_pretrained(str(tiny_flux2_klein))
    reader = CacheReader(klein_cache)
    assert reader.family is FLUX2 and reader.manifest["family"] == "flux2"
    assert reader.manifest["text"] == {"mode": "padded", "max_length": 512}
    rows = reader.row_group(reader.shards[0], 0)
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(rows["caption"][:3], device="cpu")
    assert rows["text"].shape[1:] == embeds.shape[1:] == (512, 48)
    torch.testing.assert_close(rows["text"][:3], embeds, rtol=1e-5, atol=1e-6)
    # the real tokens of each chat-templated caption: what the text encoder's attention mask holds
    masks = [pipe.tokenizer(pipe.tokenizer.apply_chat_template([{"role": "user", "content": c}], tokenize=False,
                                                                add_generation_prompt=True, enable_thinking=False),
                            padding="max_length", max_length=512, truncation=True).attention_mask
             for c in rows["caption"][:3]]
    assert rows["text_len"][:3].tolist() == [sum(m) for m in masks]
    # the cached posterior mean, normalised by the family, is the pipeline's image latent
    import tarfile
    raw = sorted((klein_cache.parent / "raw").glob("*.tar"))[0]
    with tarfile.open(raw) as tar:
        key = rows["key"][0].rsplit("/", 1)[1]
        data = tar.extractfile(f"{key}.jpg").read()
    pixels = to_model_range(prepare_image(data, SIZE).pixels[None], torch.float32)
    with torch.no_grad():
        reference = pipe._encode_vae_image(pixels, generator=None)
    torch.testing.assert_close(FLUX2.to_x0(rows["latent"][:1], reader.manifest["vae"]), reference, rtol=1e-4, atol=1e-5)


def test_flux_sample_is_the_klein_pipelines_image_with_and_without_the_lora(tiny_flux2_klein, klein_lora, tmp_path):
    from diffusers import Flux2KleinPipeline
    ours = flux_sample(tmp_path / "base", tiny_flux2_klein)   # klein base: CFG 4 by default, as the pipeline
    pipe = Flux2KleinPipeline.from_pretrained(str(tiny_flux2_klein))
    assert np.abs(ours - pipeline_image(pipe, guidance_scale=4.0)).mean() <= 1
    lora = flux_sample(tmp_path / "lora", tiny_flux2_klein, "--lora", klein_lora / "final")
    pipe.load_lora_weights(str(klein_lora / "final"))   # the trainer's final/ as diffusers reads a LoRA
    assert np.abs(lora - pipeline_image(pipe, guidance_scale=4.0)).mean() <= 1
    assert np.abs(lora - ours).mean() > 1   # the adapter changed the image: the comparison can fail
    # the trainer's own last sample is flux-sample's (the base in bf16 for LoRA: within one level)
    trained = np.asarray(Image.open(klein_lora / "samples" / "step-3" / PNG)).astype(np.int16)
    assert np.abs(trained - lora).max() <= 1


def test_lora_exported_for_comfyui_loads_back_in_diffusers(tiny_flux2_klein, klein_lora, tmp_path):
    from diffusers import Flux2KleinPipeline
    file = tmp_path / "klein-lora.safetensors"
    invoke(prep_app, "export", klein_lora / "final", "--format", "comfyui", "--output", file)
    from safetensors import safe_open
    with safe_open(str(file), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert any(k.startswith("lora_unet_double_blocks_0_img_attn_qkv") for k in keys)
    assert any(k.startswith("lora_unet_single_blocks_1_linear1") for k in keys)
    assert meta["modelspec.architecture"] == "flux-2-klein/lora" and meta["ss_base_model_version"] == "flux2"
    pipe = Flux2KleinPipeline.from_pretrained(str(tiny_flux2_klein))
    pipe.load_lora_weights(str(file))   # diffusers' own kohya reader for FLUX.2
    ours = flux_sample(tmp_path / "lora", tiny_flux2_klein, "--lora", klein_lora / "final")
    assert np.abs(ours - pipeline_image(pipe, guidance_scale=4.0)).mean() <= 1


def test_full_weights_train_resume_and_export_to_one_bfl_file(tiny_flux2_klein, klein_cache, tmp_path):
    run = train(tmp_path / "run", tiny_flux2_klein, klein_cache, "--model.init", "random", "--run.max_steps", 2,
                "--run.checkpoint_every", 1, "--run.precision", "no")
    info = json.loads((run / "final" / "flux_prep.json").read_text())
    assert info["family"] == "flux2" and info["guidance_embeds"] is False
    final = flux_sample(tmp_path / "final", tiny_flux2_klein, "--transformer", run / "final")
    checkpoint = flux_sample(tmp_path / "ckpt", tiny_flux2_klein, "--transformer", run / "checkpoints" / "step-2")
    assert np.array_equal(final, checkpoint)
    file = tmp_path / "klein.safetensors"
    invoke(prep_app, "export", run / "final", "--format", "bfl", "--output", file)
    from safetensors import safe_open
    with safe_open(str(file), "pt") as f:
        assert "double_blocks.0.img_attn.qkv.weight" in f.keys()
    assert np.array_equal(final, flux_sample(tmp_path / "bfl", tiny_flux2_klein, "--transformer", file))


def test_training_step_equals_a_reference_built_from_diffusers(tiny_flux2_klein, klein_cache, tmp_path):
    """The logged first loss against the step written out with diffusers' Flux2KleinPipeline helpers and the
    transformer class, from the same draws (timesteps, then noise in the patchified latent's shape)."""
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel

    from train.config import load_config
    from train.loop import Trainer
    from train_caches import first_step_replayed
    cfg = load_config(None, {"model.name": str(tiny_flux2_klein), "model.init": "random",
                             "data.train_cache": str(klein_cache), "data.batch_size": 4, "data.num_workers": 0,
                             "run.output_dir": str(tmp_path / "run"), "run.max_steps": 1, "run.precision": "no",
                             "run.log_every": 1, "run.tensorboard": False, "run.progress": False,
                             "flow.guidance_dropout": 0.0})
    trainer = Trainer(cfg)
    run = first_step_replayed(trainer)
    batch, model = run["batches"][0], run["initial"]
    assert isinstance(model, Flux2Transformer2DModel)
    g = torch.Generator().set_state(run["generator_state"])
    t = torch.rand(4, generator=g)
    latent = batch.latent.float()
    patched = Flux2KleinPipeline._patchify_latents(latent)
    noise = torch.randn(patched.shape, generator=g)
    bn = AutoencoderKLFlux2.from_pretrained(str(tiny_flux2_klein), subfolder="vae").bn
    x0 = (patched - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(bn.running_var.view(1, -1, 1, 1) + bn.eps)
    tb = t.view(-1, 1, 1, 1)
    x_t = (1 - tb) * x0 + tb * noise
    with torch.no_grad():
        pred = model(hidden_states=Flux2KleinPipeline._pack_latents(x_t), encoder_hidden_states=batch.text.float(),
                     timestep=t, img_ids=Flux2KleinPipeline._prepare_latent_ids(x_t),
                     txt_ids=Flux2KleinPipeline._prepare_text_ids(batch.text), guidance=None, return_dict=False)[0]
    reference = ((pred - Flux2KleinPipeline._pack_latents(noise - x0)) ** 2).mean()
    assert read_metrics(tmp_path / "run")[0]["loss"] == pytest.approx(reference.item(), rel=1e-5)


def test_dev_samples_as_flux2_pipeline_with_its_guidance_embedding(tiny_flux2_dev, tmp_path):
    from diffusers import Flux2Pipeline
    ours = flux_sample(tmp_path / "dev", tiny_flux2_dev)   # [dev]: the guidance embedding at 4, no CFG
    pipe = Flux2Pipeline.from_pretrained(str(tiny_flux2_dev))
    assert np.abs(ours - pipeline_image(pipe, guidance_scale=4.0)).mean() <= 1
    assert np.abs(ours - pipeline_image(pipe, guidance_scale=1.0)).mean() > 1


def test_a_cache_of_one_family_is_refused_by_a_model_of_the_other(tiny_flux2_klein, tmp_path, capsys):
    from train.cli import main
    flux1_cache = write_cache(tmp_path / "flux1", 8, t5_mode="padded")
    with pytest.raises(SystemExit) as e:   # refused before anything is built
        main(["--model.name", str(tiny_flux2_klein), "--data.train_cache", str(flux1_cache),
              "--flow.guidance_dropout_mode", "independent", "--run.max_steps", "1",
              "--run.output_dir", str(tmp_path / "r2")])
    assert e.value.code == 2 and "flow.guidance_dropout_mode independent" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        train(tmp_path / "run", tiny_flux2_klein, flux1_cache, "--lora.rank", 4, "--run.max_steps", 1)
    assert e.value.code == 2
    assert "holds flux1 encodings; the model is flux2" in capsys.readouterr().err
    r = CliRunner().invoke(prep_app, ["encode", "--model", str(tiny_flux2_klein), "--input", str(tmp_path),
                                      "--output", str(tmp_path / "c"), "--t5-mode", "trimmed"])
    assert r.exit_code == 2 and "not 'trimmed'" in r.output
