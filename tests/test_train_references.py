"""Edit training (reference images): the step against hand-written references built from diffusers'
FluxKontextPipeline and Flux2KleinPipeline helpers (packing, position ids, slicing); reference dropout;
the data stream's buckets; a tiny chain that trains on a cache with references and resumes exactly."""
import pytest
import torch
from train_caches import read_metrics, tiny_config, write_cache

from shared.family.flux1 import FLUX1
from shared.family.flux2 import FLUX2
from shared.presets import transformer_config
from shared.text_batch import TextBatch
from train.batch import TrainBatch
from train.step import StepSettings, draw, flow_matching_loss, training_loss

FLUX1_VAE = {"shift_factor": 0.1, "scaling_factor": 0.5}


@pytest.fixture(scope="module")
def flux1_model():
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(0)
    return FluxTransformer2DModel(**transformer_config("tiny", guidance_embeds=True)).eval()


@pytest.fixture(scope="module")
def flux2_model():
    from diffusers import Flux2Transformer2DModel
    torch.manual_seed(0)
    return Flux2Transformer2DModel(**transformer_config("flux2-tiny")).eval()


def batch_of(b, channels, h, w, refs, text_len, text_dim, pooled_dim=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TrainBatch(key=[f"k{i}" for i in range(b)], latent=torch.randn(b, channels, h, w, generator=g),
                      text=torch.randn(b, text_len, text_dim, generator=g),
                      pooled=torch.randn(b, pooled_dim, generator=g) if pooled_dim else None,
                      text_len=torch.full((b,), text_len, dtype=torch.int64),
                      refs=tuple(torch.randn(b, channels, rh, rw, generator=g) for rh, rw in refs))


@torch.no_grad()
def test_kontext_step_equals_flux_kontext_pipeline_helpers(flux1_model):
    """FluxKontextPipeline.prepare_latents: the reference packed, its ids with axis 0 = 1, appended after the
    noisy tokens; the prediction sliced back to them (its denoising loop's noise_pred[:, :latents.size(1)])."""
    from diffusers import FluxKontextPipeline as P
    batch = batch_of(2, 16, 8, 6, [(6, 10)], 7, 64, 64)
    settings = StepSettings(family=FLUX1, vae=FLUX1_VAE, guidance=2.5)
    loss = training_loss(flux1_model, batch, settings, torch.Generator().manual_seed(3), None)

    g = torch.Generator().manual_seed(3)
    t = torch.rand(2, generator=g)
    noise = torch.randn(batch.latent.shape, generator=g)
    x0 = (batch.latent - 0.1) * 0.5
    ref = (batch.refs[0] - 0.1) * 0.5       # _encode_vae_image's normalisation
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
    ref_ids = P._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32)
    ref_ids[..., 0] = 1
    ids = torch.cat([P._prepare_latent_image_ids(2, 4, 3, "cpu", torch.float32), ref_ids])
    tokens = P._pack_latents(x_t, 2, 16, 8, 6)
    pred = flux1_model(hidden_states=torch.cat([tokens, P._pack_latents(ref, 2, 16, 6, 10)], dim=1),
                       encoder_hidden_states=batch.text, pooled_projections=batch.pooled, timestep=t,
                       img_ids=ids, txt_ids=torch.zeros(7, 3), guidance=torch.full((2,), 2.5),
                       return_dict=False)[0][:, :tokens.shape[1]]
    reference = ((pred - P._pack_latents(noise - x0, 2, 16, 8, 6)) ** 2).mean()
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_flux2_step_with_two_references_equals_flux2_klein_pipeline_helpers(flux2_model):
    """Flux2KleinPipeline.prepare_image_latents: each reference patchified, normalised, packed, at
    t = 10 + 10 i (_prepare_image_ids), after the noisy tokens."""
    from diffusers import Flux2KleinPipeline as P
    mean, var = torch.randn(32) * 0.1, torch.rand(32) + 0.5
    vae = {"bn_mean": mean.tolist(), "bn_var": var.tolist(), "batch_norm_eps": 1e-4}
    batch = batch_of(2, 8, 8, 8, [(8, 4), (4, 8)], 6, 48)
    settings = StepSettings(family=FLUX2, vae=vae)
    loss = training_loss(flux2_model, batch, settings, torch.Generator().manual_seed(5), None)

    def x0_of(latent):
        return (P._patchify_latents(latent) - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + 1e-4)
    g = torch.Generator().manual_seed(5)
    t = torch.rand(2, generator=g)
    x0 = x0_of(batch.latent)
    noise = torch.randn(x0.shape, generator=g)
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
    refs = [x0_of(r) for r in batch.refs]
    ref_ids = P._prepare_image_ids([r[:1] for r in refs])[0]
    tokens = P._pack_latents(x_t)
    pred = flux2_model(hidden_states=torch.cat([tokens, *[P._pack_latents(r) for r in refs]], dim=1),
                       encoder_hidden_states=batch.text, timestep=t,
                       img_ids=torch.cat([P._prepare_latent_ids(x_t)[0], ref_ids]),
                       txt_ids=P._prepare_text_ids(batch.text)[0], guidance=None,
                       return_dict=False)[0][:, :tokens.shape[1]]
    reference = ((pred - P._pack_latents(noise - x0)) ** 2).mean()
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("family", ["flux1", "flux2"])
def test_a_dropped_reference_gives_the_loss_without_references(family, flux1_model, flux2_model):
    """ref_keep False masks the sample's reference tokens as keys: its loss is the loss with no references at
    all; a kept sample's is the loss with them."""
    if family == "flux1":
        model, fam, vae, batch = flux1_model, FLUX1, FLUX1_VAE, batch_of(2, 16, 8, 8, [(8, 8)], 5, 64, 64)
    else:
        vae = {"bn_mean": [0.0] * 32, "bn_var": [1.0] * 32, "batch_norm_eps": 1e-4}
        model, fam, batch = flux2_model, FLUX2, batch_of(2, 8, 8, 8, [(8, 8)], 5, 48)
    settings = StepSettings(family=fam, vae=vae, guidance=3.0 if family == "flux1" else None)
    t, text = torch.tensor([0.3, 0.7]), TextBatch(batch.text, batch.pooled, None)
    noise = torch.randn(2, *settings.x0_shape(batch.latent.shape[1:]), generator=torch.Generator().manual_seed(1))
    masked = flow_matching_loss(model, batch.latent, text, t, noise, settings, refs=batch.refs,
                                ref_keep=torch.tensor([False, True]))
    none = flow_matching_loss(model, batch.latent, text, t, noise, settings)
    kept = flow_matching_loss(model, batch.latent, text, t, noise, settings, refs=batch.refs)
    torch.testing.assert_close(masked[0], none[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(masked[1], kept[1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(kept[0], none[0])


def test_reference_coins_come_last_and_only_when_asked():
    batch = batch_of(4, 16, 8, 8, [(8, 8)], 5, 64, 64)
    plain = draw(batch, StepSettings(family=FLUX1, vae=FLUX1_VAE), torch.Generator().manual_seed(2))
    with_refs = draw(batch, StepSettings(family=FLUX1, vae=FLUX1_VAE, reference_dropout=0.5),
                     torch.Generator().manual_seed(2))
    assert "ref_keep" not in plain and torch.equal(plain["noise"], with_refs["noise"])
    g = torch.Generator().manual_seed(2)
    draw(batch, StepSettings(family=FLUX1, vae=FLUX1_VAE), g)
    assert torch.equal(with_refs["ref_keep"], torch.rand(4, generator=g) >= 0.5)


def test_a_cache_with_references_trains_in_buckets_of_matching_shapes_and_resumes_exactly(tmp_path):
    """Target sizes 8x8 / 8x12 and reference sizes 8x8 / 4x8 / 8x12 make batches of one shape each; a run
    stopped after step 3 and resumed logs the uninterrupted run's losses."""
    cache = write_cache(tmp_path / "cache", 18, t5_mode="padded", sizes=((8, 8), (8, 12)), references=1,
                        ref_sizes=((8, 8), (4, 8), (8, 12)), rows_per_shard=9, row_group_rows=3)
    settings = {"run.max_steps": 6, "run.checkpoint_every": 3, "data.batch_size": 2, "flow.reference_dropout": 0.5,
                "run.deterministic": True, "lora.rank": 4, "run.precision": "bf16"}
    from train.loop import train
    shapes, keys_full, keys_cut = set(), [], []

    def seen(keys):
        return lambda b: (keys.append(tuple(b.key)), shapes.add((tuple(b.latent.shape), tuple(b.refs[0].shape))))
    train(tiny_config(tmp_path / "a", cache, **settings), on_batch=seen(keys_full))
    train(tiny_config(tmp_path / "b", cache, **settings), stop_after_step=4, on_batch=seen(keys_cut))
    keys_resumed = []
    train(tiny_config(tmp_path / "b", cache, **settings, **{"run.resume": "auto"}), on_batch=seen(keys_resumed))
    losses = lambda d: [(m["step"], m["loss"]) for m in read_metrics(d / "run") if "loss" in m]  # noqa: E731
    assert losses(tmp_path / "b") == losses(tmp_path / "a") and len(losses(tmp_path / "a")) == 6
    assert keys_cut[:3] + keys_resumed == keys_full
    assert len({s[1][2:] for s in shapes}) > 1       # batches of several reference shapes, each one shape


def test_samples_during_training_on_a_reference_cache_are_refused_naming_the_key(tmp_path):
    cache = write_cache(tmp_path / "cache", 4, t5_mode="padded", references=1)
    from train.loop import Trainer
    with pytest.raises(ValueError, match="run.sample_every"):
        Trainer(tiny_config(tmp_path, cache, **{"run.sample_every": 2}))


def test_a_kontext_cache_and_a_flux1_model_refuse_each_other(tiny_kontext, tmp_path):
    from shared.family.flux1_kontext import FLUX1_KONTEXT
    from shared.models import ModelLoadError
    from train.loop import Trainer
    kontext_cache = write_cache(tmp_path / "kontext", 4, t5_mode="padded", references=1, family=FLUX1_KONTEXT)
    with pytest.raises(ModelLoadError, match="holds flux1-kontext encodings; the model is flux1"):
        Trainer(tiny_config(tmp_path / "a", kontext_cache))
    flux1_cache = write_cache(tmp_path / "flux1", 4, t5_mode="padded")
    with pytest.raises(ModelLoadError, match="holds flux1 encodings; the model is flux1-kontext"):
        Trainer(tiny_config(tmp_path / "b", flux1_cache, **{"model.name": str(tiny_kontext)}))
