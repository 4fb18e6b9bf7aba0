"""Options of the step, through the trainer: the posterior sample, independent dropout."""
import json

import pytest
from train_caches import first_step_replayed, tiny_config, write_cache

from shared.models import TRAINING_INFO
from train.loop import Trainer


def test_posterior_sample_and_independent_dropout_train_on_the_cache_logvar(tmp_path):
    cache = write_cache(tmp_path / "lv", 8, logvar=True)
    trainer = Trainer(tiny_config(tmp_path, cache, **{
        "run.max_steps": 2, "flow.latent": "sample", "flow.guidance_dropout": 0.5,
        "flow.guidance_dropout_mode": "independent"}))
    assert trainer.settings.latent == "sample" and trainer.settings.dropout_mode == "independent"
    run = first_step_replayed(trainer)
    assert all(b["latent_logvar"].shape == b["latent"].shape for b in run["batches"])
    assert run["logged"] == pytest.approx(run["replayed"], rel=1e-6)
    info = json.loads((tmp_path / "run/final" / TRAINING_INFO).read_text())
    assert info["latent"] == "sample" and info["guidance_dropout_mode"] == "independent"
