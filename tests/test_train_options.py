"""Options of the step, through the trainer: the posterior sample, independent dropout, the guidance
embedding, the timestep samplers and gradient accumulation."""
import copy
import dataclasses
import json

import pytest
import torch

from train_caches import first_step_replayed, read_metrics, tiny_config, write_cache

from shared.run_files import TRAINING_INFO
from shared.schedules import shift_mu, time_shift
from shared.text_batch import TextBatch
from train.loop import Trainer
from train.step import draw, flow_matching_loss


def test_posterior_sample_and_independent_dropout_train_on_the_cache_logvar(tmp_path):
    cache = write_cache(tmp_path / "lv", 8, logvar=True)
    trainer = Trainer(tiny_config(tmp_path, cache, **{
        "run.max_steps": 2, "flow.latent": "sample", "flow.guidance_dropout": 0.5,
        "flow.guidance_dropout_mode": "independent"}))
    assert trainer.settings.latent == "sample" and trainer.settings.dropout_mode == "independent"
    run = first_step_replayed(trainer)
    assert all(b.latent_logvar.shape == b.latent.shape for b in run["batches"])
    assert run["logged"] == pytest.approx(run["replayed"], rel=1e-6)
    info = json.loads((tmp_path / "run/final" / TRAINING_INFO).read_text())
    assert info["latent"] == "sample" and info["guidance_dropout_mode"] == "independent"


def test_guidance_embedding_is_fed_and_trained(tmp_path):
    """model.guidance reaches a guidance-distilled model (guidance_embeds=True), whose guidance
    embedding learns, and flux_prep.json tells the sampler the value."""
    cache = write_cache(tmp_path / "c", 8)
    cfg = tiny_config(tmp_path, cache, **{"run.max_steps": 2, "model.overrides": {"guidance_embeds": True},
                                          "model.guidance": 3.5})
    trainer = Trainer(cfg)
    assert trainer.settings.guidance == 3.5
    run = first_step_replayed(trainer)
    assert run["logged"] == pytest.approx(run["replayed"], rel=1e-6)
    embedder = "time_text_embed.guidance_embedder"
    before = {k: v for k, v in run["initial"].state_dict().items() if k.startswith(embedder)}
    after = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    assert before and all(not torch.equal(v, after[k]) for k, v in before.items())
    info = json.loads((tmp_path / "run/final" / TRAINING_INFO).read_text())
    assert info["guidance_embeds"] is True and info["guidance"] == 3.5
    # The value matters: the same batch and draws with another guidance give another loss.
    batch, g = run["batches"][0], torch.Generator().manual_seed(0)
    r = draw(batch, trainer.settings, g)
    losses = [flow_matching_loss(run["initial"], batch.latent, batch.text_batch(), r["t"], r["noise"],
                                 dataclasses.replace(trainer.settings, guidance=value)).mean().item()
              for value in (1.0, 3.5)]
    assert abs(losses[0] - losses[1]) > 1e-5


@pytest.mark.parametrize("sampler", ["logit_normal", "flux_shift"])
def test_samplers_through_the_trainer(tmp_path, sampler):
    """The config's sampler and its parameters reach the step: t drawn for the cache's latents
    (8x12, so 24 image tokens for flux_shift) follows the sampler's law."""
    cache = write_cache(tmp_path / "c", 8, sizes=((8, 12),))
    trainer = Trainer(tiny_config(tmp_path, cache, **{"run.max_steps": 1, "flow.sampler": sampler,
                                                      "flow.logit_mean": 0.5, "flow.logit_std": 0.7}))
    run = first_step_replayed(trainer)
    assert run["logged"] == pytest.approx(run["replayed"], rel=1e-6)
    first = run["batches"][0]   # its first latent 20000 times (draw reads only the latents here)
    many = dataclasses.replace(first, latent=first.latent[:1].expand(20000, -1, -1, -1))
    t = draw(many, trainer.settings, torch.Generator().manual_seed(1))["t"]
    if sampler == "logit_normal":   # sigmoid(N(0.5, 0.7))
        logit = torch.logit(t.double())
        assert abs(logit.mean() - 0.5) < 0.02 and abs(logit.std() - 0.7) < 0.02
    else:   # uniform u pushed through FLUX's shift with mu(24 tokens): P(t <= shift(q)) = q
        mu = shift_mu(24)
        for q in (0.25, 0.5, 0.75):
            assert abs((t <= time_shift(torch.tensor(q), mu)).float().mean() - q) < 0.015
        assert abs(t.mean() - 0.5) > 0.05   # far from uniform: the shift was applied


def test_grad_accum_equals_one_big_batch_in_fp32(tmp_path):
    """Two micro-batches of 4 make one optimizer step equal to a step on the batch of 8 with the same
    draws. optim.eps = 1 makes AdamW's first step scale with the gradient (its update is
    lr * g / (|g| + eps)), so a missing 1/grad_accum would show."""
    cache = write_cache(tmp_path / "p", 16, t5_mode="padded")
    cfg = tiny_config(tmp_path, cache, **{"run.max_steps": 1, "run.grad_accum": 2, "optim.eps": 1.0,
                                          "optim.grad_clip": 0.0})
    trainer = Trainer(cfg)
    run = first_step_replayed(trainer)
    a, b = run["batches"]
    reference = copy.deepcopy(run["initial"])
    generator = torch.Generator().set_state(run["generator_state"])
    draws = [draw(x, trainer.settings, generator) for x in (a, b)]
    big = {k: torch.cat([getattr(a, k), getattr(b, k)]) for k in ("latent", "text", "pooled")}
    loss = flow_matching_loss(reference, big["latent"], TextBatch(big["text"], big["pooled"]),
                              torch.cat([d["t"] for d in draws]), torch.cat([d["noise"] for d in draws]),
                              trainer.settings).mean()
    loss.backward()
    torch.optim.AdamW(reference.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas, eps=1.0,
                      weight_decay=cfg.optim.weight_decay).step()
    assert read_metrics(tmp_path / "run")[0]["loss"] == pytest.approx(loss.item(), rel=1e-6)
    trained = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    moved = 0
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(trained[name], value, rtol=1e-5, atol=1e-8)
        moved += int(not torch.equal(value, run["initial"].state_dict()[name]))
    assert moved > 0
