"""FLUX.2's family (shared/family/flux2.py, flux2_text.py) against diffusers' FLUX.2 pipelines as the outside
reference, on the tiny [klein] and [dev] folders: text encoding, VAE normalisation, packing and ids, the
schedule, LoRA targets, and a hand-written sampler made of the family's methods only that gives the
pipelines' images."""
import json
import re
import shutil

import numpy as np
import pytest
import torch

from shared.family.flux2 import FLUX2
from shared.models import ModelLoadError
from shared.text_batch import TextBatch

PROMPTS = ["a red circle on a white background", "blue square"]


def _pipe(folder):
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def klein(tiny_flux2_klein):
    return _pipe(tiny_flux2_klein)


@pytest.fixture(scope="module")
def dev(tiny_flux2_dev):
    return _pipe(tiny_flux2_dev)


@pytest.fixture(params=["klein", "dev"])
def kind(request):
    return request.param


def _folder_and_pipe(request, kind):
    return request.getfixturevalue(f"tiny_flux2_{kind}"), request.getfixturevalue(kind)


def _encoder(folder, **kw):
    return FLUX2.load_text_encoder(str(folder), "cpu", torch.float32, mode="padded", max_length=None, **kw)


def _seen_attention_mask(pipe, prompts):
    """The pipeline's prompt embedding, and the attention mask its text encoder was given."""
    seen = {}
    hook = pipe.text_encoder.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    try:
        embeds, _ = pipe.encode_prompt(prompts, device="cpu")
    finally:
        hook.remove()
    return embeds, seen["attention_mask"]


# -- text ------------------------------------------------------------------------------------------------
def test_encode_equals_the_pipelines_encode_prompt(kind, request):
    folder, pipe = _folder_and_pipe(request, kind)
    enc = _encoder(folder)
    expected, mask = _seen_attention_mask(pipe, PROMPTS)
    out = enc.encode(PROMPTS)
    assert set(out) == {"text", "text_len"}
    assert out["text"].shape == (2, 512, pipe.transformer.config.joint_attention_dim)
    assert torch.equal(out["text"], expected)
    assert torch.equal(out["text_len"], mask.sum(1))
    assert out["text_len"][0] > out["text_len"][1] > 0 and out["text_len"].max() < 512
    encodings = enc.prompt_encodings(PROMPTS, batch_size=1)
    assert [e.pooled for e in encodings] == [None, None]
    assert torch.equal(torch.stack([e.states for e in encodings]), expected)
    assert enc.dims() == {"text_dim": expected.shape[-1]} == FLUX2.text_dims(str(folder))
    assert FLUX2.text_lengths(str(folder), PROMPTS, None) == (mask.sum(1).tolist(), 512)
    assert enc.identities["text"]["part"] == "text_encoder" and enc.identities["text"]["sha256"]
    assert enc.facts() == {}


def test_variant_from_model_index_or_config_and_unknown_refused(tiny_flux2_dev, tmp_path):
    from shared.family.flux2_text import MISTRAL3, text_variant
    assert text_variant(str(tiny_flux2_dev)) is MISTRAL3
    bare = tmp_path / "bare"                      # no model_index.json: the config's architectures say it
    shutil.copytree(tiny_flux2_dev / "text_encoder", bare / "text_encoder")
    assert text_variant(str(bare)) is MISTRAL3
    config = json.loads((bare / "text_encoder/config.json").read_text())
    (bare / "text_encoder/config.json").write_text(json.dumps({**config, "architectures": ["T5EncoderModel"]}))
    with pytest.raises(ModelLoadError, match="T5EncoderModel.*not one of FLUX.2's"):
        text_variant(str(bare))


def test_trimmed_text_options_and_masks_refused(tiny_flux2_klein):
    with pytest.raises(ValueError, match="only text mode 'padded'"):
        FLUX2.load_text_encoder(str(tiny_flux2_klein), "cpu", torch.float32, mode="trimmed", max_length=None)
    with pytest.raises(ValueError, match="takes no options.*t5_impl"):
        _encoder(tiny_flux2_klein, options={"t5_impl": "fused"})
    text = TextBatch(torch.zeros(1, 4, 48), None, torch.tensor([[True, True, False, False]]))
    with pytest.raises(ValueError, match="text mask"):
        FLUX2.predict(None, torch.zeros(1, 4, 32), torch.zeros(1), text, 4, 4)


def test_max_length_override(tiny_flux2_klein, klein):
    enc = FLUX2.load_text_encoder(str(tiny_flux2_klein), "cpu", torch.float32, mode="padded", max_length=64)
    expected, _ = klein.encode_prompt(PROMPTS, device="cpu", max_sequence_length=64)
    assert torch.equal(enc.encode(PROMPTS)["text"], expected)


# -- latents ---------------------------------------------------------------------------------------------
def _facts_through_json(vae):
    return json.loads(json.dumps(FLUX2.vae_facts(vae)))


def test_vae_facts_are_the_batchnorm_statistics(klein):
    facts = _facts_through_json(klein.vae)
    bn = klein.vae.bn
    assert torch.equal(torch.tensor(facts["bn_mean"], dtype=torch.float32), bn.running_mean)
    assert torch.equal(torch.tensor(facts["bn_var"], dtype=torch.float32), bn.running_var)
    assert facts["batch_norm_eps"] == klein.vae.config.batch_norm_eps


def test_to_x0_and_from_x0_are_the_pipelines_normalisation(klein):
    vae = klein.vae
    facts = _facts_through_json(vae)
    image = torch.rand(2, 3, 48, 80, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        expected = klein._encode_vae_image(image, generator=None)
        mean = vae.encode(image).latent_dist.mode()
    x0 = FLUX2.to_x0(mean, facts)
    assert x0.dtype == torch.float32 and x0.shape == (2, *FLUX2.x0_shape(mean.shape[1], 6, 10))
    assert torch.equal(x0, expected)
    # the pipelines' inverse before vae.decode
    bn = vae.bn
    std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    before_decode = klein._unpatchify_latents(x0 * std + bn.running_mean.view(1, -1, 1, 1))
    assert torch.equal(FLUX2.from_x0(x0, facts), before_decode)
    assert torch.allclose(FLUX2.from_x0(x0, facts), mean, atol=1e-5)


def test_pack_unpack_and_ids_are_the_pipelines(klein):
    from diffusers import Flux2KleinPipeline as P
    h, w = 6, 10                                            # VAE latent size; tokens on a 3 x 5 grid
    x0 = torch.randn(2, 32, h // 2, w // 2)
    tokens = FLUX2.pack(x0)
    assert torch.equal(tokens, P._pack_latents(x0)) and tokens.shape[1] == FLUX2.image_tokens(h, w)
    ids = P._prepare_latent_ids(x0)
    assert torch.equal(FLUX2.unpack(tokens, h, w), P._unpack_latents_with_ids(tokens, ids, h // 2, w // 2))
    assert torch.equal(FLUX2.image_ids(h, w), ids[0].float())
    assert torch.equal(FLUX2.text_ids(7), P._prepare_text_ids(torch.zeros(1, 7, 3))[0].float())
    with pytest.raises(ValueError, match="do not make a 6x8 latent"):
        FLUX2.unpack(tokens, h, 8)


@pytest.mark.parametrize("steps,tokens", [(4, 16), (50, 4096), (28, 1024), (8, 5000), (1, 256)])
def test_sampling_sigmas_are_the_schedulers(tiny_flux2_klein, steps, tokens):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_flux2_klein / "scheduler")
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=compute_empirical_mu(tokens, steps))
    sigmas = FLUX2.sampling_sigmas(steps, tokens, True)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (steps + 1,)
    assert torch.equal(sigmas, sched.sigmas)
    assert sigmas[-1] == 0 and sigmas[0] == 1


def test_unshifted_schedule_refused():
    with pytest.raises(ValueError, match="always shift"):
        FLUX2.sampling_sigmas(4, 16, False)


# -- layers ----------------------------------------------------------------------------------------------
def _linears(model):
    return {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _expected_lora_targets(cfg):
    double = [f"transformer_blocks.{i}.{m}" for i in range(cfg.num_layers) for m in (
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
        "attn.add_v_proj", "attn.to_add_out", "ff.linear_in", "ff.linear_out", "ff_context.linear_in",
        "ff_context.linear_out")]
    single = [f"single_transformer_blocks.{i}.attn.{m}" for i in range(cfg.num_single_layers)
              for m in ("to_qkv_mlp_proj", "to_out")]
    return set(double + single)


def test_lora_targets_are_the_block_projections_and_nothing_else(dev):
    model = dev.transformer                                 # with the guidance embedding
    names = {n for n, _ in model.named_modules()}
    matched = {n for n in names if re.fullmatch(FLUX2.default_lora_targets, n)}
    assert matched == _expected_lora_targets(model.config) and matched <= _linears(model)
    # a wrapper's prefix (torch.compile's _orig_mod., FSDP's) still matches; the per-sample layers never do
    assert re.fullmatch(FLUX2.default_lora_targets, "_orig_mod.single_transformer_blocks.1.attn.to_out")
    assert not any(FLUX2.per_sample_layer(n) for n in matched)


def test_per_sample_layers_are_the_modulation_and_embeddings(dev):
    model = dev.transformer
    per_sample = {n for n in _linears(model) if FLUX2.per_sample_layer(n)}
    assert per_sample == {
        "time_guidance_embed.timestep_embedder.linear_1", "time_guidance_embed.timestep_embedder.linear_2",
        "time_guidance_embed.guidance_embedder.linear_1", "time_guidance_embed.guidance_embedder.linear_2",
        "double_stream_modulation_img.linear", "double_stream_modulation_txt.linear",
        "single_stream_modulation.linear", "norm_out.linear"}
    # each sees one row per image: its input is the [B, width] time embedding, never a token sequence
    rows = {}
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: rows.__setitem__(n, a[0].shape))
             for n, m in model.named_modules() if n in per_sample]
    try:
        with torch.no_grad():
            FLUX2.predict(model, torch.randn(2, 4, 32), torch.full((2,), 0.5), TextBatch(torch.randn(2, 3, 48)),
                          4, 4, guidance=4.0)
    finally:
        for hook in hooks:
            hook.remove()
    assert set(rows) == per_sample and all(len(shape) == 2 and shape[0] == 2 for shape in rows.values())


def test_lora_saved_with_diffusers_loads_back_with_diffusers(tiny_flux2_klein, tmp_path):
    """An adapter on the default targets, saved with Flux2KleinPipeline.save_lora_weights and loaded by
    load_lora_weights into a fresh pipeline, gives the adapted transformer's outputs."""
    from diffusers import Flux2KleinPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    trained = _pipe(tiny_flux2_klein).transformer
    torch.manual_seed(0)
    trained.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False,
                                   target_modules=FLUX2.default_lora_targets))
    Flux2KleinPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(trained))
    fresh = _pipe(tiny_flux2_klein)
    inputs = (torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(2)), torch.full((1,), 0.7),
              TextBatch(torch.randn(1, 5, 48, generator=torch.Generator().manual_seed(3))), 8, 8)
    with torch.no_grad():
        base = FLUX2.predict(fresh.transformer, *inputs)
        fresh.load_lora_weights(tmp_path)
        loaded, adapted = FLUX2.predict(fresh.transformer, *inputs), FLUX2.predict(trained, *inputs)
    lora_modules = {n.split(".lora_A")[0] for n, _ in fresh.transformer.named_modules() if n.endswith(".lora_A")}
    assert lora_modules == _expected_lora_targets(fresh.transformer.config)
    assert torch.allclose(loaded, adapted, atol=1e-6) and not torch.allclose(base, adapted, atol=1e-3)


def test_misfits(klein, tiny_flux2_klein):
    cfg = klein.transformer.config
    dims = {"latent_channels": klein.vae.config.latent_channels, **FLUX2.text_dims(str(tiny_flux2_klein))}
    assert FLUX2.misfits(cfg, dims) == {}
    assert FLUX2.misfits(dict(cfg), {**dims, "text_dim": 64}) == {"text_dim": (48, 64)}
    assert FLUX2.misfits(cfg, {**dims, "latent_channels": 32}) == {"latent_channels": (32, 128)}


# -- end to end --------------------------------------------------------------------------------------------
def _family_sample(folder, vae, transformer, prompt, *, steps, size, seed, guidance=None, cfg=None):
    """A sampler made of the family's methods only: the noise as the pipelines draw it (randn_tensor of the
    x0 shape from a seeded generator), Euler steps x + (sigma_next - sigma) v in float32, true CFG where
    `cfg`, the guidance embedding where `guidance`; then from_x0 and the VAE's decoder."""
    from diffusers.utils.torch_utils import randn_tensor
    text_encoder = _encoder(folder)
    cond, uncond = text_encoder.prompt_encodings([prompt, ""])
    cond, uncond = TextBatch.collate([cond]), TextBatch.collate([uncond])
    h = w = size // (2 ** (len(vae.config.block_out_channels) - 1))
    shape = (1, *FLUX2.x0_shape(vae.config.latent_channels, h, w))
    x = FLUX2.pack(randn_tensor(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32))
    sigmas = FLUX2.sampling_sigmas(steps, FLUX2.image_tokens(h, w), True)
    with torch.no_grad():
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            t = sigma.expand(1)
            v = FLUX2.predict(transformer, x, t, cond, h, w, guidance=guidance)
            if cfg is not None:
                v_uncond = FLUX2.predict(transformer, x, t, uncond, h, w, guidance=guidance)
                v = v_uncond + cfg * (v - v_uncond)
            x = x.float() + (sigma_next - sigma) * v.float()
        latent = FLUX2.from_x0(FLUX2.unpack(x, h, w), FLUX2.vae_facts(vae))
        return (vae.decode(latent).sample / 2 + 0.5).clamp(0, 1)


@pytest.mark.parametrize("which", ["klein", "dev"])
def test_family_sampler_gives_the_pipelines_image(which, request):
    """[klein] base: true CFG at 4 (two passes); [dev]: the guidance embedding at 4 (one pass)."""
    folder, pipe = _folder_and_pipe(request, which)
    expected = pipe(prompt=PROMPTS[0], height=64, width=64, num_inference_steps=4, guidance_scale=4.0,
                    generator=torch.Generator().manual_seed(0), output_type="pt").images
    mode = {"cfg": 4.0} if which == "klein" else {"guidance": 4.0}
    if which == "klein":
        assert pipe.do_classifier_free_guidance     # base klein: the pipeline ran the "" prompt's pass too
    image = _family_sample(folder, pipe.vae, pipe.transformer, PROMPTS[0], steps=4, size=64, seed=0, **mode)
    assert image.shape == expected.shape == (1, 3, 64, 64) and expected.std() > 0.01
    mismatch = (image - expected).abs().max()
    other = _family_sample(folder, pipe.vae, pipe.transformer, PROMPTS[1], steps=4, size=64, seed=0, **mode)
    assert mismatch < 1e-4
    # the agreement is finer than what the prompt changes (a toy text encoder changes little)
    assert (other - expected).abs().max() > 10 * max(mismatch, 1e-6)
