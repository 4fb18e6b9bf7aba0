"""A checkpoint that lacks a sharded state the run keeps (the EMA's shards under FSDP, ema/) is refused
before anything is loaded, naming the folder and what is missing."""
import pytest
from train_caches import tiny_config, write_cache

from train.checkpoint import load_checkpoint
from train.loop import Trainer


def test_a_checkpoint_without_a_sharded_state_of_the_run_is_refused(tmp_path):
    cache = write_cache(tmp_path / "c", 8)
    trainer = Trainer(tiny_config(tmp_path, cache, **{"run.max_steps": 1, "run.checkpoint_every": 1,
                                                      "ema.decay": 0.5}))
    trainer.train()
    path = tmp_path / "run/checkpoints/step-1"   # one process: its EMA is pickled by accelerate, no ema/
    with pytest.raises(ValueError, match=r"step-1 has no ema/ \(written by a run without it\)"):
        load_checkpoint(trainer.accelerator, path, trainer.generators, {"ema": trainer.ema.named_weights()})
