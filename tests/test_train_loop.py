"""The trainer end to end on the CPU: resume, outputs, LoRA, refusals, and that it learns."""
import json

import pytest
import torch
from safetensors.torch import load_file
from train_caches import first_step_replayed, read_metrics, set_manifest, tiny_config, write_cache

from shared.cache import CacheError
from shared.models import ModelLoadError
from shared.run_files import TRAINING_INFO
from train.loop import Trainer, train


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("caches")
    train_cache = write_cache(root / "train", 24, sizes=((8, 8), (8, 12)), rows_per_shard=8, row_group_rows=4)
    val_cache = write_cache(root / "val", 8, seed=9, prefix="val")
    return train_cache, val_cache


RESUME_SETTINGS = {"run.max_steps": 8, "run.checkpoint_every": 3, "data.num_workers": 2, "data.batch_size": 3,
                   "flow.guidance_dropout": 0.3, "ema.decay": 0.9, "schedule.kind": "cosine",
                   "schedule.warmup_steps": 2, "run.deterministic": True}


def test_resume_after_kill_matches_uninterrupted_run(tmp_path, caches):
    keys_full, keys_cut = [], []
    full = tiny_config(tmp_path / "a", *caches, **RESUME_SETTINGS)
    train(full, on_batch=lambda b: keys_full.append(tuple(b.key)))

    cut = tiny_config(tmp_path / "b", *caches, **RESUME_SETTINGS)
    train(cut, stop_after_step=4, on_batch=lambda b: keys_cut.append(tuple(b.key)))   # killed after step 4
    assert (tmp_path / "b/run/checkpoints/step-3").is_dir() and not (tmp_path / "b/run/final").exists()
    resumed = tiny_config(tmp_path / "b", *caches, **RESUME_SETTINGS, **{"run.resume": "auto"})
    keys_resumed = []
    train(resumed, on_batch=lambda b: keys_resumed.append(tuple(b.key)))

    losses = lambda d: [(m["step"], m["loss"]) for m in read_metrics(d / "run") if "loss" in m]  # noqa: E731
    assert losses(tmp_path / "b") == losses(tmp_path / "a")
    assert len(losses(tmp_path / "a")) == 8
    # The resumed run continues with the batches after checkpoint 3: nothing seen twice or skipped.
    assert keys_cut[:3] + keys_resumed == keys_full
    epoch = [k for batch in keys_full for k in batch][:24]
    assert sorted(epoch) == [f"train-{i:05d}" for i in range(24)]
    a = load_file(tmp_path / "a/run/final/diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "b/run/final/diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ema_a = load_file(tmp_path / "a/run/final/ema/diffusion_pytorch_model.safetensors")
    ema_b = load_file(tmp_path / "b/run/final/ema/diffusion_pytorch_model.safetensors")
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)


def test_final_loads_with_from_pretrained_and_records_conventions(tmp_path, caches):
    from diffusers import FluxTransformer2DModel
    cfg = tiny_config(tmp_path, *caches, **{"run.max_steps": 2})
    trainer = Trainer(cfg)
    trainer.train()
    final = tmp_path / "run/final"
    loaded = FluxTransformer2DModel.from_pretrained(final)
    trained = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in loaded.state_dict().items())
    info = json.loads((final / TRAINING_INFO).read_text())
    assert info["text_mode"] == "trimmed" and info["text_max_length"] == 32 and info["family"] == "flux1"
    assert {"shift_schedule", "default_steps", "guidance_dropout", "base_model"} <= set(info)
    assert info["resolution"] == 64 and info["guidance"] is None   # the cache's size; tiny has no guidance embedding
    assert not (tmp_path / "run/final.tmp").exists()


def test_validation_passes_agree_and_draw_the_noise_once(tmp_path, caches):
    from train.step import summarize_validation, validation_sums
    trainer = Trainer(tiny_config(tmp_path, *caches, **{"data.val_batch_size": 3}))
    trainer.model.eval()
    first = trainer.validate()
    assert len(trainer._val_batches) == 3 and trainer.val_noise.draws == 3 * 8
    assert trainer.validate() == first and trainer.val_noise.draws == 3 * 8   # reused, not drawn again
    # The same value as drawing the noise afresh (the code before the cache).
    fresh = validation_sums(trainer.model, trainer._val_batches, trainer.settings, trainer.device)
    assert summarize_validation(fresh) == first
    # With no room for it the noise is drawn on each pass, with the same values.
    uncached = Trainer(tiny_config(tmp_path / "b", *caches, **{"data.val_batch_size": 3,
                                                              "data.val_noise_cache_mb": 0}))
    uncached.model.eval()
    assert uncached.validate() == first and uncached.validate() == first
    assert uncached.val_noise.draws == 2 * 3 * 8 and uncached.val_noise.bytes == 0


def test_lora_saves_only_the_adapter(tmp_path, caches):
    cfg = tiny_config(tmp_path, *caches, **{"run.max_steps": 3, "lora.rank": 4, "run.checkpoint_every": 2,
                                            "run.precision": "bf16"})
    trainer = Trainer(cfg)
    frozen = {k: v.clone() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()
              if "lora" not in k}
    trainer.train()
    final = tmp_path / "run/final"
    assert sorted(p.name for p in final.iterdir()) == ["flux_prep.json", "pytorch_lora_weights.safetensors"]
    adapter = load_file(final / "pytorch_lora_weights.safetensors")
    assert adapter and all("lora" in k for k in adapter)
    assert json.loads((final / TRAINING_INFO).read_text())["lora"]["rank"] == 4
    ckpt = tmp_path / "run/checkpoints/step-2"
    assert (ckpt / "pytorch_lora_weights.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
    after = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    assert all(torch.equal(v, after[k]) for k, v in frozen.items())   # the base stayed frozen


def test_wrong_cache_refused_before_step_one(tmp_path):
    padded = write_cache(tmp_path / "padded", 8, t5_mode="padded")
    cfg = tiny_config(tmp_path, padded, **{"data.expected_text_mode": "trimmed"})
    with pytest.raises(CacheError, match="T5 mode"):
        Trainer(cfg)
    set_manifest(padded, schema_version=2)
    with pytest.raises(CacheError, match="schema version"):
        Trainer(tiny_config(tmp_path, padded))
    plain = write_cache(tmp_path / "plain", 8)
    with pytest.raises(CacheError, match="no latent_logvar column"):
        Trainer(tiny_config(tmp_path, plain, **{"flow.latent": "sample"}))
    val = write_cache(tmp_path / "val", 8, prefix="val")
    set_manifest(val, vae={"scaling_factor": 1.0, "shift_factor": 0.0})
    with pytest.raises(CacheError, match="encoded otherwise than the training cache"):
        Trainer(tiny_config(tmp_path, plain, val))
    set_manifest(plain, vae={})
    with pytest.raises(CacheError, match="no vae.shift_factor"):
        Trainer(tiny_config(tmp_path, plain))
    assert not (tmp_path / "run").exists()


def test_flex_masking_needs_cuda_and_auto_picks_sdpa_on_cpu(tmp_path, caches):
    with pytest.raises(ModelLoadError, match="masked_attention flex needs a CUDA device"):
        Trainer(tiny_config(tmp_path, *caches, **{"run.masked_attention": "flex"}))
    trainer = Trainer(tiny_config(tmp_path, *caches, **{"run.compile": False}))   # auto
    assert trainer.settings.flex_mask is False


def test_corrupt_shard_stops_the_run_naming_it(tmp_path, capsys):
    from train.cli import main
    cache = write_cache(tmp_path / "c", 16, rows_per_shard=8)
    shard = sorted(cache.glob("*.parquet"))[-1]
    shard.write_bytes(b"not parquet" + shard.read_bytes()[100:])
    with pytest.raises(SystemExit) as e:
        main(["--data.train_cache", str(cache), "--model.name", "tiny", "--run.max_steps", "2",
              "--run.output_dir", str(tmp_path / "run"), "--run.precision", "no", "--data.num_workers", "0",
              "--run.tensorboard", "true", "--run.progress", "false"])
    assert e.value.code == 2   # a cache that cannot be used, as encode says of one
    assert shard.name in capsys.readouterr().err
    assert not (tmp_path / "run").exists()   # no config.json, no logs: nothing was trained


def test_padded_cache_trains(tmp_path):
    """Padded text reaches the model whole (every position, no mask), and step 1's logged loss is the
    flow-matching loss of that batch, its guidance dropout included."""
    cache = write_cache(tmp_path / "p", 8, t5_mode="padded")
    trainer = Trainer(tiny_config(tmp_path, cache, **{"run.max_steps": 2, "flow.guidance_dropout": 0.5}))
    run = first_step_replayed(trainer)
    assert all(b.text_mask is None and b.text.shape == (4, 32, 64) for b in run["batches"])
    assert run["logged"] == pytest.approx(run["replayed"], rel=1e-6)


def test_tiny_model_learns(tmp_path):
    train_cache = write_cache(tmp_path / "train", 64, row_group_rows=8, rows_per_shard=32)
    val_cache = write_cache(tmp_path / "val", 16, seed=3, prefix="val")
    cfg = tiny_config(tmp_path, train_cache, val_cache, **{
        "run.max_steps": 80, "data.batch_size": 8, "optim.lr": 2e-3, "run.val_every": 80, "run.log_every": 20,
        "schedule.warmup_steps": 5, "flow.guidance_dropout": 0.1})
    train(cfg)
    val = [m["val/loss"] for m in read_metrics(tmp_path / "run") if "val/loss" in m]
    assert len(val) == 2
    assert val[-1] < 0.75 * val[0], val


def test_a_small_cache_trains_with_fewer_workers(tmp_path, capsys):
    cache = write_cache(tmp_path / "small", 6, rows_per_shard=8, row_group_rows=8)   # one row group
    trainer = Trainer(tiny_config(tmp_path, cache, **{"data.num_workers": 2, "run.max_steps": 3}))
    assert trainer.num_workers == 1
    assert "too few row groups for data.num_workers 2 per process: using 1" in capsys.readouterr().out
    summary = trainer.train()
    assert summary["step"] == 3


def test_epochs_set_the_steps_and_one_epoch_sees_each_sample_once(tmp_path):
    cache = write_cache(tmp_path / "c", 24)   # one latent size: 24 / (batch 4 x accumulation 2) = 3 steps
    keys = []
    summary = train(tiny_config(tmp_path, cache, **{"run.max_steps": None, "run.epochs": 1, "run.grad_accum": 2}),
                    on_batch=lambda b: keys.extend(b.key))
    assert summary["step"] == 3 and [m["step"] for m in read_metrics(tmp_path / "run")] == [1, 2, 3]
    assert sorted(keys) == [f"train-{i:05d}" for i in range(24)]


def test_keep_checkpoints_keeps_the_newest(tmp_path, caches):
    def steps(keep, out):
        train(tiny_config(out, caches[0], **{"run.max_steps": 4, "run.checkpoint_every": 1,
                                           "run.keep_checkpoints": keep}))
        return sorted(p.name for p in (out / "run/checkpoints").iterdir())
    assert steps(2, tmp_path / "two") == ["step-3", "step-4"]
    assert steps(0, tmp_path / "all") == ["step-1", "step-2", "step-3", "step-4"]   # 0: keep every one


def test_resume_with_another_worker_count_is_refused(tmp_path, caches):
    settings = {"run.max_steps": 1, "run.checkpoint_every": 1, "data.num_workers": 1}
    train(tiny_config(tmp_path, caches[0], **settings))
    more = tiny_config(tmp_path, caches[0], **{**settings, "run.max_steps": 2, "data.num_workers": 2,
                                             "run.resume": "auto"})
    with pytest.raises(ValueError, match="noise generators of 1 DataLoader worker.s. per process, this run has 2"):
        train(more)


def test_metrics_report_the_effective_batch_on_many_small_buckets(tmp_path):
    """A LoRA-sized cache in many latent sizes: every step trains data.batch_size x run.grad_accum samples,
    and the metrics say so (samples_per_step) and how many were distinct (distinct_per_step: fewer where a
    size's last batch repeated its samples), as the batches the trainer consumed show."""
    sizes = [(8, 8)] * 5 + [(8, 12)] * 5 + [(4, 16), (16, 4), (8, 4), (4, 8), (12, 4)]
    cache = write_cache(tmp_path / "c", 15, sizes=sizes, rows_per_shard=15, row_group_rows=15)
    seen = []
    train(tiny_config(tmp_path, cache, **{"data.batch_size": 4, "run.grad_accum": 2, "run.max_steps": 4}),
          on_batch=lambda b: seen.append(b.key))
    records = [m for m in read_metrics(tmp_path / "run") if "loss" in m]
    assert [m["samples_per_step"] for m in records] == [8.0] * 4
    distinct = [len(set(seen[2 * i])) + len(set(seen[2 * i + 1])) for i in range(4)]
    assert [m["distinct_per_step"] for m in records] == distinct and min(distinct) < 8
