"""The tiny FLUX.2 folders: diffusers layout, real classes, Flux2KleinPipeline / Flux2Pipeline-loadable
offline, deterministic."""
import hashlib
import json

import pytest
import torch
import torch.nn.functional as F

from shared.tiny import VOCAB_WORDS
from shared.tiny_flux2 import LATENT_CHANNELS, write_tiny_flux2_klein

PROMPT = "a red circle on a white background"


def _digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _klein(folder):
    from diffusers import Flux2KleinPipeline
    pipe = Flux2KleinPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _dev(folder):
    from diffusers import Flux2Pipeline
    pipe = Flux2Pipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(pipe, **kwargs):
    out = pipe(prompt=PROMPT, height=64, width=64, num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0), **kwargs).images
    assert out.shape == (1, 64, 64, 3)
    assert torch.isfinite(torch.from_numpy(out)).all() and out.std() > 0
    return out


def test_klein_layout_classes_and_shapes(tiny_flux2_klein):
    index = json.loads((tiny_flux2_klein / "model_index.json").read_text())
    assert index["_class_name"] == "Flux2KleinPipeline" and index["is_distilled"] is False
    assert index["text_encoder"] == ["transformers", "Qwen3ForCausalLM"]
    assert index["tokenizer"][1] in ("Qwen2Tokenizer", "Qwen2TokenizerFast")
    assert index["vae"] == ["diffusers", "AutoencoderKLFlux2"]
    transformer = json.loads((tiny_flux2_klein / "transformer/config.json").read_text())
    vae = json.loads((tiny_flux2_klein / "vae/config.json").read_text())
    text = json.loads((tiny_flux2_klein / "text_encoder/config.json").read_text())
    assert transformer["in_channels"] == 4 * vae["latent_channels"] == 4 * LATENT_CHANNELS
    assert transformer["joint_attention_dim"] == 3 * text["hidden_size"]
    assert sum(transformer["axes_dims_rope"]) == transformer["attention_head_dim"]
    assert transformer["guidance_embeds"] is False
    files = [p for p in tiny_flux2_klein.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    assert sum(p.stat().st_size for p in files) < 2 * 2**20


def test_klein_pipeline_makes_an_image_offline(tiny_flux2_klein):
    pipe = _klein(tiny_flux2_klein)
    _image(pipe, guidance_scale=4.0)
    assert pipe.do_classifier_free_guidance is True   # base klein: the negative prompt's pass ran too


def test_same_seed_same_files_and_the_distilled_flag(tmp_path):
    a = _digest(write_tiny_flux2_klein(tmp_path / "a", seed=3))
    b = _digest(write_tiny_flux2_klein(tmp_path / "b", seed=3))
    c_folder = write_tiny_flux2_klein(tmp_path / "c", seed=4, distilled=True)
    c = _digest(c_folder)
    assert a == b
    assert a["transformer/diffusion_pytorch_model.safetensors"] != c["transformer/diffusion_pytorch_model.safetensors"]
    assert a["tokenizer/tokenizer.json"] == c["tokenizer/tokenizer.json"]
    assert json.loads((c_folder / "model_index.json").read_text())["is_distilled"] is True
    assert _klein(c_folder).config.is_distilled is True   # the pipeline then ignores guidance_scale


def test_qwen3_chat_template_is_what_the_pipeline_tokenizes(tiny_flux2_klein):
    """Flux2KleinPipeline._get_qwen3_prompt_embeds renders the template with enable_thinking=False: a ChatML
    user turn, the generation prompt and an empty think block, padded to 512 (Qwen3's template semantics)."""
    from diffusers import Flux2KleinPipeline
    pipe = _klein(tiny_flux2_klein)
    tok = pipe.tokenizer
    seen = {}
    hook = pipe.text_encoder.register_forward_pre_hook(lambda m, args, kw: seen.update(kw), with_kwargs=True)
    try:
        Flux2KleinPipeline._get_qwen3_prompt_embeds(pipe.text_encoder, tok, PROMPT)
    finally:
        hook.remove()
    text = f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    expected = tok(text, padding="max_length", max_length=512, return_tensors="pt")
    assert torch.equal(seen["input_ids"], expected.input_ids)
    assert torch.equal(seen["attention_mask"], expected.attention_mask)
    n = int(expected.attention_mask.sum())
    assert seen["input_ids"][0, n:].eq(tok.pad_token_id).all() and n < 30
    message = [{"role": "user", "content": PROMPT}]   # the think block only when thinking is off
    assert tok.apply_chat_template(message, tokenize=False, add_generation_prompt=True).endswith("assistant\n")
    for word in VOCAB_WORDS:   # the demo's words are whole tokens
        assert len(tok.tokenize(" " + word)) == 1 and len(tok.tokenize(word)) == 1, word


@pytest.mark.parametrize("kind", ["klein", "dev"])
def test_text_layers_exist_and_are_intermediate(kind, tiny_flux2_klein, tiny_flux2_dev):
    """The prompt embedding stacks the pipeline's layers (9, 18, 27) / (10, 20, 30) into 3 x width; each
    is an intermediate layer (not the final-normed last hidden state), as in the real encoders."""
    pipe = _klein(tiny_flux2_klein) if kind == "klein" else _dev(tiny_flux2_dev)
    layers = (9, 18, 27) if kind == "klein" else (10, 20, 30)
    seen = {}
    hook = pipe.text_encoder.register_forward_hook(lambda m, args, kw, out: seen.update(out=out), with_kwargs=True)
    try:
        embeds, _ = pipe.encode_prompt(PROMPT, device="cpu")
    finally:
        hook.remove()
    assert embeds.shape == (1, 512, pipe.transformer.config.joint_attention_dim)
    hidden = seen["out"].hidden_states
    assert len(hidden) == max(layers) + 2
    assert torch.equal(embeds, torch.cat([hidden[k] for k in layers], dim=-1))


def test_batchnorm_statistics_are_non_trivial_and_pooling_latents_are_block_colours(tiny_flux2_klein):
    """The pipeline normalises the 2x2-patchified latent by the VAE's BatchNorm statistics; with the pooling
    VAE the normalised latent is each 8x8 block's colour (0 on the unused channels), and the pipeline's
    inverse plus decoding repeats it."""
    pipe = _klein(tiny_flux2_klein)
    bn = pipe.vae.bn
    assert bn.running_mean.numel() == 4 * LATENT_CHANNELS
    assert bn.running_mean.abs().min() > 0 and bn.running_mean.std() > 0.1
    assert (bn.running_var - 1).abs().max() > 0.1 and bn.running_var.std() > 0.1
    x = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        x0 = pipe._encode_vae_image(x, generator=None)
    pooled = F.avg_pool2d(x, 8)
    expected = pipe._patchify_latents(torch.cat([pooled, torch.zeros(1, LATENT_CHANNELS - 3, 4, 6)], dim=1))
    assert x0.shape == (1, 4 * LATENT_CHANNELS, 2, 3)
    assert torch.allclose(x0, expected, atol=1e-4)
    std = torch.sqrt(bn.running_var + pipe.vae.config.batch_norm_eps).view(1, -1, 1, 1)
    latents = pipe._unpatchify_latents(x0 * std + bn.running_mean.view(1, -1, 1, 1))
    with torch.no_grad():
        decoded = pipe.vae.decode(latents).sample
    assert torch.allclose(decoded, F.interpolate(pooled, scale_factor=8, mode="nearest"), atol=1e-4)


def test_random_vae_option(tmp_path):
    with pytest.raises(ValueError, match="unknown tiny VAE kind"):
        write_tiny_flux2_klein(tmp_path / "x", vae="trained")
    from diffusers import AutoencoderKLFlux2
    vae = AutoencoderKLFlux2.from_pretrained(write_tiny_flux2_klein(tmp_path / "r", vae="random") / "vae")
    # one mean and variance per patchified channel, not per latent channel
    assert vae.bn.running_mean.view(-1, 4).std(dim=1).min() > 0
    assert vae.bn.running_var.view(-1, 4).std(dim=1).min() > 0


def test_dev_pipeline_makes_an_image_with_the_guidance_embedding(tiny_flux2_dev):
    index = json.loads((tiny_flux2_dev / "model_index.json").read_text())
    assert index["_class_name"] == "Flux2Pipeline"
    assert index["text_encoder"] == ["transformers", "Mistral3ForConditionalGeneration"]
    pipe = _dev(tiny_flux2_dev)
    assert pipe.transformer.config.guidance_embeds is True
    _image(pipe, guidance_scale=4.0)
    x = torch.randn(1, 16, pipe.transformer.config.in_channels)
    ids = pipe._prepare_latent_ids(torch.zeros(1, 1, 4, 4)).float()
    text, text_ids = torch.randn(1, 8, pipe.transformer.config.joint_attention_dim), torch.zeros(1, 8, 4)
    with torch.no_grad():
        a, b = (pipe.transformer(x, text, torch.full((1,), 0.5), ids, text_ids, guidance=torch.full((1,), g)).sample
                for g in (1.0, 4.0))
    assert not torch.allclose(a, b)   # the guidance value reaches the transformer


def test_dev_chat_template_has_the_system_prompt_and_instruction(tiny_flux2_dev):
    """Flux2Pipeline sends [system, user] turns with list-of-blocks content through apply_chat_template."""
    from diffusers.pipelines.flux2.pipeline_flux2 import SYSTEM_MESSAGE, format_input
    tok = _dev(tiny_flux2_dev).tokenizer
    text = tok.apply_chat_template(format_input([PROMPT])[0], tokenize=False)
    assert text == f"<s>[SYSTEM_PROMPT]{SYSTEM_MESSAGE}[/SYSTEM_PROMPT][INST]{PROMPT}[/INST]"
    ids = tok(text).input_ids
    assert ids[:2] == [tok.bos_token_id, tok.convert_tokens_to_ids("[SYSTEM_PROMPT]")]
    assert tok.convert_ids_to_tokens(ids[-9:]) == ["[INST]", "a", "Ġred", "Ġcircle", "Ġon", "Ġa", "Ġwhite",
                                                   "Ġbackground", "[/INST]"]
