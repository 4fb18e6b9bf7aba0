"""The sampler's loop against diffusers' FluxPipeline on the tiny model folder (fp32, CPU)."""
from pathlib import Path

import numpy as np
import pytest
import torch

from sample.run import SampleOptions, encode, load_sampling_transformer, plan
from shared.family.flux1 import FLUX1
from shared.sampling import decode, guided_batch
from shared.sampling import denoise as _denoise
from shared.sampling import initial_noise as _initial_noise
from shared.text_batch import TextBatch

PROMPT = "a red circle on a blue background"


def initial_noise(seeds, height, width, device, dtype):
    return _initial_noise(FLUX1, 16, seeds, height, width, device, dtype)


def denoise(transformer, noise, text, **kw):
    return _denoise(FLUX1, transformer, noise, text, **kw)


def encode_all(model, prompts, mode):
    """FLUX.1's text encodings as flux-sample makes them (the library's T5)."""
    encoder = FLUX1.load_text_encoder(str(model), "cpu", torch.float32, mode=mode, max_length=32,
                                      options=FLUX1.sampling_text_options)
    return encoder.prompt_encodings(prompts)
W, H, STEPS, SEED = 64, 48, 4, 3


@pytest.fixture(scope="module")
def tiny_guidance_model(tmp_path_factory):
    from shared.tiny import write_tiny_model
    return write_tiny_model(tmp_path_factory.mktemp("tiny_g") / "model", seed=0, guidance_embeds=True)


def _ours(model, **kw):
    """Final packed latents and uint8 pixels from the project's loop, set up as flux-sample sets it up."""
    opts = SampleOptions(model=str(model), output=Path("unused"), prompts=[PROMPT], width=W, height=H,
                         steps=STEPS, seeds=[SEED], progress=False, **kw)
    p = plan(opts)
    cond, empty, _ = encode(opts, p)
    transformer = load_sampling_transformer(p.source, p.lora, p.dtype, p.device)
    x = denoise(transformer, initial_noise([SEED], H, W, "cpu", torch.float32), guided_batch(cond, empty),
                height_px=H, width_px=W, steps=STEPS, shift=p.conv.shift, guidance=p.guidance,
                cfg_scale=p.cfg_scale)
    from shared.family import load_vae
    return x, decode(FLUX1, load_vae(str(model)), x, H, W).numpy()


def _pipeline(model, output_type, **kw):
    from diffusers import FluxPipeline
    pipe = FluxPipeline.from_pretrained(str(model))
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, height=H, width=W, num_inference_steps=STEPS,
                generator=torch.Generator("cpu").manual_seed(SEED), max_sequence_length=32,
                output_type=output_type, **kw).images


@pytest.mark.parametrize("which", ["plain", "guidance_embeds"])
def test_same_image_as_flux_pipeline(which, tiny_model, tiny_guidance_model):
    model = tiny_model if which == "plain" else tiny_guidance_model
    kw = {"guidance": 4.0} if which == "guidance_embeds" else {}
    ours_x, ours_px = _ours(model, **kw)
    ref_x = _pipeline(model, "latent", guidance_scale=4.0)
    assert ours_x.shape == ref_x.shape
    assert torch.allclose(ours_x, ref_x, atol=1e-5, rtol=0), (ours_x - ref_x).abs().max()
    ref_px = np.round(_pipeline(model, "np", guidance_scale=4.0) * 255).astype(np.int16)
    assert np.abs(ours_px.astype(np.int16) - ref_px).max() <= 1


def test_guidance_value_matters(tiny_guidance_model):
    a, _ = _ours(tiny_guidance_model, guidance=1.0)
    b, _ = _ours(tiny_guidance_model, guidance=6.0)
    assert (a - b).abs().max() > 1e-3


def test_batched_cfg_equals_flux_pipeline_two_forwards(tiny_model):
    """Our one batched forward (cond; uncond) == FluxPipeline's two separate forwards with true CFG."""
    ours_x, _ = _ours(tiny_model, cfg_scale=3.0)
    ref_x = _pipeline(tiny_model, "latent", true_cfg_scale=3.0, negative_prompt="")
    assert torch.allclose(ours_x, ref_x, atol=1e-5, rtol=0), (ours_x - ref_x).abs().max()
    plain_x, _ = _ours(tiny_model)
    assert (plain_x - ours_x).abs().max() > 1e-3


def test_cfg_halves_go_through_one_transformer_call_per_step(tiny_model):
    """Batched CFG: each step is ONE transformer forward on 2B rows (the prompts', then the empty prompt's),
    where FluxPipeline makes two (its result is the same: the test above)."""
    from shared.family import load_transformer
    transformer = load_transformer(str(tiny_model))
    rows = []
    transformer.register_forward_pre_hook(lambda m, args, kw: rows.append(kw["hidden_states"].shape[0]),
                                          with_kwargs=True)
    cond, empty = encode_all(tiny_model, [PROMPT, ""], "padded")
    text = guided_batch([cond, cond], empty)
    denoise(transformer, initial_noise([0, 1], 32, 32, "cpu", torch.float32), text, height_px=32, width_px=32,
            steps=3, cfg_scale=3.0)
    assert rows == [4, 4, 4]   # 3 steps, each one call on 2 images x (prompt, empty prompt)


def test_trimmed_batch_masks_padding(tiny_model):
    """Trimmed T5: prompts of different lengths batched together (padding masked) give what each
    gives alone (no padding at all); and trimmed is a different conditioning from padded."""
    from shared.family import load_transformer
    prompts = ["a red circle", "two small blue squares on a large green background"]
    enc = encode_all(tiny_model, prompts, "trimmed")
    assert enc[0].states.shape[0] < enc[1].states.shape[0]
    transformer = load_transformer(str(tiny_model))
    run = dict(height_px=32, width_px=32, steps=2)
    batch = TextBatch.collate(enc)
    assert batch.mask is not None and not bool(batch.mask[0].all())
    together = denoise(transformer, initial_noise([0, 1], 32, 32, "cpu", torch.float32), batch, **run)
    for i, seed in enumerate([0, 1]):
        alone = denoise(transformer, initial_noise([seed], 32, 32, "cpu", torch.float32),
                        TextBatch.collate([enc[i]]), **run)
        assert torch.allclose(together[i], alone[0], atol=1e-5), i
    # length buckets (for a compiled transformer): more masked padding, the same images
    bucketed = TextBatch.collate(enc, pad_multiple=16)
    assert bucketed.states.shape[1] == 16 and batch.states.shape[1] < 16
    x_bucket = denoise(transformer, initial_noise([0, 1], 32, 32, "cpu", torch.float32), bucketed, **run)
    assert torch.allclose(x_bucket, together, atol=1e-5)
    padded = encode_all(tiny_model, prompts[:1], "padded")
    x_pad = denoise(transformer, initial_noise([0], 32, 32, "cpu", torch.float32), TextBatch.collate(padded), **run)
    assert (x_pad[0] - together[0]).abs().max() > 1e-4


def test_noise_per_seed_independent_of_batch():
    both = initial_noise([5, 7], 32, 32, "cpu", torch.float32)
    assert torch.equal(both[1:], initial_noise([7], 32, 32, "cpu", torch.float32))
    assert both.shape == (2, 4, 64)


def test_speed_options_keep_the_result(tiny_model):
    """The benchmark's fast path (fused q/k/v, each block traced whole by torch.compile) computes the same
    latents; the 'eager' compile backend checks the full-graph tracing without a C++ toolchain."""
    from sample.loop import configure_speed
    from shared.family import load_transformer
    text = TextBatch.collate(encode_all(tiny_model, [PROMPT], "padded"))
    run = dict(height_px=32, width_px=32, steps=2)
    noise = initial_noise([0], 32, 32, "cpu", torch.float32)
    plain = denoise(load_transformer(str(tiny_model)), noise, text, **run)
    fast = configure_speed(load_transformer(str(tiny_model)), compile_blocks=True, compile_backend="eager",
                           fuse_qkv=True, attention_backend="native")
    assert torch.allclose(denoise(fast, noise, text, **run), plain, atol=1e-5)
