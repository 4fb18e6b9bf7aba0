"""The tiny model folder: diffusers layout, real classes, FluxPipeline-loadable offline, deterministic."""
import hashlib
import json

import pytest
import torch
from typer.testing import CliRunner

from preprocess.cli import app
from shared.family.flux1_text import encode_prompts, load_clip, load_t5
from shared.models import ModelLoadError, model_identity, refuse_pickle
from shared.family import load_transformer, load_vae

LAYOUT = ["model_index.json", "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
          "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json",
          "text_encoder/model.safetensors", "text_encoder_2/config.json", "text_encoder_2/model.safetensors",
          "tokenizer/tokenizer.json", "tokenizer_2/tokenizer.json", "scheduler/scheduler_config.json"]


def _digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_layout_and_classes(tiny_model):
    for rel in LAYOUT:
        assert (tiny_model / rel).is_file(), rel
    index = json.loads((tiny_model / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "FluxTransformer2DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"][1] == "CLIPTextModel" and index["text_encoder_2"][1] == "T5EncoderModel"
    assert json.loads((tiny_model / "vae/config.json").read_text())["latent_channels"] == 16
    assert not list(tiny_model.rglob("*.bin"))


def test_flux_pipeline_loads_and_makes_an_image_offline(tiny_model):
    from diffusers import FluxPipeline
    pipe = FluxPipeline.from_pretrained(tiny_model, local_files_only=True)
    out = pipe("a red circle on a white background", height=64, width=64, num_inference_steps=2,
               max_sequence_length=32, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (1, 64, 64, 3)
    assert torch.isfinite(torch.from_numpy(out)).all() and out.std() > 0


def test_cli_writes_the_same_folder_for_the_same_seed(tmp_path):
    runner = CliRunner()
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        result = runner.invoke(app, ["tiny-model", str(tmp_path / name), "--seed", str(seed)])
        assert result.exit_code == 0, result.output
    a, b, c = (_digest(tmp_path / n) for n in "abc")
    assert a == b
    assert a["transformer/diffusion_pytorch_model.safetensors"] != c["transformer/diffusion_pytorch_model.safetensors"]
    assert a["tokenizer_2/tokenizer.json"] == c["tokenizer_2/tokenizer.json"]


def test_guidance_embeds_variant(tmp_path):
    from shared.tiny import write_tiny_model
    folder = write_tiny_model(tmp_path / "g", seed=0, guidance_embeds=True)
    assert load_transformer(str(folder)).config.guidance_embeds is True


def test_loaders_and_prompt_encoding(tiny_model):
    vae = load_vae(str(tiny_model))
    assert vae.config.latent_channels == 16 and vae.config.scaling_factor == pytest.approx(0.3611)
    t5_tok, t5 = load_t5(str(tiny_model))
    clip_tok, clip = load_clip(str(tiny_model))
    prompts = ["a red circle on a white background", "a blue square"]
    padded = encode_prompts(prompts, t5_tok, t5, clip_tok, clip, t5_mode="padded", t5_max_length=32)
    trimmed = encode_prompts(prompts, t5_tok, t5, clip_tok, clip, t5_mode="trimmed", t5_max_length=32)
    assert padded["t5"].shape == (2, 32, 64) and padded["clip"].shape == (2, 64)
    n0, n1 = trimmed["t5_len"].tolist()
    assert trimmed["t5"].shape == (2, n0, 64) and n0 > n1 >= 3
    assert torch.equal(padded["t5_len"], trimmed["t5_len"])
    # The two conventions differ: padded T5 attends to the padding, trimmed does not.
    assert not torch.allclose(padded["t5"][1, :n1], trimmed["t5"][1, :n1])
    # Trimmed encodings of a prompt do not depend on the longer prompt in its batch.
    alone = encode_prompts(prompts[1:], t5_tok, t5, clip_tok, clip, t5_mode="trimmed", t5_max_length=32)
    assert torch.allclose(alone["t5"][0], trimmed["t5"][1, :n1], atol=1e-5)
    assert torch.equal(padded["clip"], trimmed["clip"])


def test_missing_part_names_part_and_path(tiny_model, tmp_path):
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(ModelLoadError, match=r"broken: missing text_encoder_2/ \(the T5 text encoder\)"):
        load_t5(str(broken))
    with pytest.raises(ModelLoadError, match="no such folder"):
        load_vae(str(tmp_path / "nowhere"))


def test_pickled_weights_refused(tiny_model, tmp_path):
    import shutil
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model, folder)
    (folder / "vae/diffusion_pytorch_model.safetensors").unlink()
    torch.save({}, folder / "vae/diffusion_pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="only pickled weights.*refused"):
        load_vae(str(folder))
    with pytest.raises(ModelLoadError, match="arbitrary code"):
        refuse_pickle("flux1-dev.ckpt")


def test_model_identity_changes_with_weights(tiny_model, tmp_path):
    from shared.tiny import write_tiny_model
    other = write_tiny_model(tmp_path / "other", seed=1)
    a = model_identity(str(tiny_model), "text_encoder_2")
    assert a == model_identity(str(tiny_model), "text_encoder_2")
    assert a["sha256"] != model_identity(str(other), "text_encoder_2")["sha256"]


def test_pooling_vae_keeps_block_colours(tiny_model):
    """The hand-set tiny VAE: x0 is the 8x8 block mean colour, decoding repeats it (shared/tiny_vae.py)."""
    import torch.nn.functional as F

    from shared.latents import scale_latents
    vae = load_vae(str(tiny_model))
    x = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        x0 = scale_latents(posterior.mean, vae.config.shift_factor, vae.config.scaling_factor)
        pooled = F.avg_pool2d(x, 8)
        assert x0.shape == (2, 16, 4, 6)
        assert torch.allclose(x0[:, :3], pooled, atol=1e-4)
        assert torch.allclose(x0[:, 3:], torch.zeros(()), atol=1e-5)
        decoded = vae.decode(posterior.mean).sample
    assert torch.allclose(decoded, F.interpolate(pooled, scale_factor=8, mode="nearest"), atol=1e-4)


def test_random_vae_option(tmp_path):
    from shared.tiny import write_tiny_model
    with pytest.raises(ValueError, match="unknown tiny VAE kind"):
        write_tiny_model(tmp_path / "x", vae="trained")
    vae = load_vae(str(write_tiny_model(tmp_path / "r", vae="random")))
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        decoded = vae.decode(vae.encode(x).latent_dist.mean).sample
    assert not torch.allclose(decoded, x, atol=0.3)


def test_trimmed_length_buckets_leave_real_tokens_unchanged(tiny_model):
    """pad_to_multiple_of rounds the trimmed batch up (for a compiled T5); masked padding changes nothing."""
    t5_tok, t5 = load_t5(str(tiny_model))
    clip_tok, clip = load_clip(str(tiny_model))
    prompts = ["a red circle on a white background", "a blue square"]
    plain = encode_prompts(prompts, t5_tok, t5, clip_tok, clip, t5_mode="trimmed", t5_max_length=32)
    bucketed = encode_prompts(prompts, t5_tok, t5, clip_tok, clip, t5_mode="trimmed", t5_max_length=32,
                              pad_to_multiple_of=16)
    assert plain["t5"].shape[1] < 16 and bucketed["t5"].shape[1] == 16
    assert torch.equal(bucketed["t5_len"], plain["t5_len"])
    for i, n in enumerate(plain["t5_len"].tolist()):
        assert torch.allclose(bucketed["t5"][i, :n], plain["t5"][i, :n], atol=1e-5)
    padded = encode_prompts(prompts, t5_tok, t5, clip_tok, clip, t5_mode="padded", t5_max_length=32,
                            pad_to_multiple_of=16)
    assert padded["t5"].shape[1] == 32   # padded mode keeps FLUX's max_length
    # a max length that is no multiple of the bucket caps the padding instead of failing
    capped = encode_prompts(prompts, t5_tok, t5, clip_tok, clip, t5_mode="trimmed", t5_max_length=10,
                            pad_to_multiple_of=16)
    assert capped["t5"].shape[1] == 10 and capped["t5_len"].tolist() == plain["t5_len"].tolist()  # 8 rounds to 16, capped at 10


@pytest.mark.parametrize("legacy_eos", [False, True])
def test_clip_runs_only_up_to_the_pooled_token_with_the_same_result(tiny_model, legacy_eos):
    from shared.family.flux1_text import clip_pooled
    clip_tok, clip = load_clip(str(tiny_model))
    if legacy_eos:   # older CLIP configs say eos_token_id 2: transformers then pools at the largest token id
        for module in (clip, getattr(clip, "text_model", None)):   # where each transformers version reads it
            if module is not None and hasattr(module, "eos_token_id"):
                module.eos_token_id = 2
        clip.config.eos_token_id = 2
    prompts = ["a red circle", "", "a blue square on a green field " * 3, "dog " * 200]   # the last is truncated
    ids = clip_tok(prompts, padding="max_length", max_length=clip_tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids
    seen = []
    hook = clip.register_forward_pre_hook(lambda m, args, kw: seen.append(kw.get("input_ids", args[0] if args else None).shape[1]),
                                          with_kwargs=True)
    try:
        full = clip(ids).pooler_output
        assert seen.pop() == 77
        for batch in ([0, 1, 2, 3], [0, 1], [1]):
            got = clip_pooled(clip, ids[batch], clip_tok.eos_token_id, "cpu")
            assert torch.allclose(got, full[batch], atol=1e-5), batch
        cut = seen
    finally:
        hook.remove()
    assert cut[0] == 77            # the truncated prompt's end-of-text token is the last position
    assert cut[1] < 77 and cut[1] % 16 == 0 and cut[2] == 16


def test_cli_refuses_an_existing_folder_unless_overwrite(tmp_path):
    """A folder that holds something (trained weights, say) is not written over without --overwrite; with it,
    the folder is replaced whole, so no file of what was there is left beside the tiny model."""
    runner = CliRunner()
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "flux_prep.json").write_text("{}")
    refused = runner.invoke(app, ["tiny-model", str(folder)])
    assert refused.exit_code == 2 and f"{folder}: exists and is not empty; pass --overwrite" in refused.output
    assert [p.name for p in folder.iterdir()] == ["flux_prep.json"]
    replaced = runner.invoke(app, ["tiny-model", str(folder), "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert not (folder / "flux_prep.json").exists() and (folder / "model_index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]   # no temporary folder left
    (tmp_path / "empty").mkdir()   # an empty folder is as good as none
    assert runner.invoke(app, ["tiny-model", str(tmp_path / "empty")]).exit_code == 0
