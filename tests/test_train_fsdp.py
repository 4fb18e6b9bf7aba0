"""The trainer under FSDP2 (accelerate with configs/accelerate/fsdp.yaml) across 2 CPU processes over
gloo: the losses and weights of one process with the same global batch, final/ equal to the gathered
shards, and a SIGKILL after a checkpoint resumed to the uninterrupted run's losses and weights."""
import json

import pytest
import torch
from safetensors.torch import load_file
from train_caches import read_metrics, write_cache
from train_launcher import launch, launch_and_kill, same_global_batch, write_config

from train.config import load_config
from train.loop import Trainer, train
from train.model import build_transformer

pytestmark = pytest.mark.distributed

STEPS = 4


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """(config, run folder) of a 2-process FSDP2 run: 4 steps, a sharded checkpoint every 2."""
    root = tmp_path_factory.mktemp("fsdp")
    cache = write_cache(root / "train", 16, rows_per_shard=8, row_group_rows=2)
    val = write_cache(root / "val", 4, seed=9, prefix="val")
    config = write_config(root / "a", cache, val, max_steps=STEPS, checkpoint_every=2, keep_checkpoints=2)
    return config, launch(config)


def train_losses(run_dir) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in read_metrics(run_dir) if "loss" in m]


def final_weights(run_dir) -> dict:
    return load_file(run_dir / "final/diffusion_pytorch_model.safetensors")


def test_two_fsdp2_processes_train_as_one_process_with_their_global_batch(fsdp_run, tmp_path):
    config, run = fsdp_run
    # FSDP2 ran: the checkpoint holds each rank's shards (DCP files), no whole-model file.
    model_ckpt = run / f"checkpoints/step-{STEPS}/pytorch_model_fsdp_0"
    assert (model_ckpt / "__0_0.distcp").is_file() and (model_ckpt / "__1_0.distcp").is_file()
    assert not (run / f"checkpoints/step-{STEPS}/model.safetensors").exists()

    one = tmp_path / "one"
    train(load_config(config, {**same_global_batch(2), "run.output_dir": str(one)}))
    two_m = [m for m in read_metrics(run) if "loss" in m]
    one_m = [m for m in read_metrics(one) if "loss" in m]
    assert [m["step"] for m in two_m] == [m["step"] for m in one_m] == list(range(1, STEPS + 1))
    for a, b in zip(two_m, one_m):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5, abs=1e-6)
    val_two = [m["val/loss"] for m in read_metrics(run) if "val/loss" in m]
    val_one = [m["val/loss"] for m in read_metrics(one) if "val/loss" in m]
    assert val_two == pytest.approx(val_one, rel=1e-5) and len(val_two) >= 1

    # Each step, rank 0 read what the one process's first accumulated batch held, rank 1 its second.
    ranks = [json.loads((run / f"seen/rank{r}.json").read_text()) for r in (0, 1)]
    per_step = [k for s in range(STEPS) for r in ranks for k in r["keys"][2 * s:2 * s + 2]]
    assert json.loads((one / "seen/rank0.json").read_text())["keys"] == per_step
    assert not set(ranks[0]["keys"]) & set(ranks[1]["keys"])
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]   # the gathered weights, on both ranks

    two_w, one_w = final_weights(run), final_weights(one)
    assert set(two_w) == set(one_w)
    for k in one_w:
        torch.testing.assert_close(two_w[k], one_w[k], rtol=1e-5, atol=1e-6, msg=k)
    cfg = load_config(config)
    start = build_transformer(cfg.model, seed=cfg.run.seed).state_dict()
    moved = sum(not torch.equal(one_w[k], start[k]) for k in one_w)
    assert moved > len(one_w) // 2   # the runs trained: most tensors left their initial values


def test_fsdp2_final_is_the_gathered_shards_and_loads_with_from_pretrained(fsdp_run, tmp_path):
    from accelerate.utils import merge_fsdp_weights
    from diffusers import FluxTransformer2DModel
    _, run = fsdp_run
    merge_fsdp_weights(str(run / f"checkpoints/step-{STEPS}/pytorch_model_fsdp_0"), str(tmp_path / "merged"))
    shards = load_file(tmp_path / "merged/model.safetensors")
    loaded = FluxTransformer2DModel.from_pretrained(run / "final").state_dict()
    assert set(shards) == set(loaded) and len(shards) > 0
    assert all(torch.equal(shards[k], loaded[k]) for k in shards)
    assert json.loads((run / "final/flux_prep.json").read_text())["steps_trained"] == STEPS


def test_fsdp2_run_killed_after_a_checkpoint_resumes_to_the_same_losses_and_weights(fsdp_run, tmp_path):
    config, full = fsdp_run
    out = launch_and_kill(config, "checkpoints/step-2/trainer_state.json", **{"run.output_dir": str(tmp_path / "run")})
    assert not (out / "final").exists()
    launch(config, **{"run.output_dir": str(out), "run.resume": "auto"})
    assert train_losses(out) == train_losses(full)
    resumed, uninterrupted = final_weights(out), final_weights(full)
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
    # Another number of processes is refused, naming both counts.
    with pytest.raises(ValueError, match="written by 2 processes, this run has 1"):
        Trainer(load_config(config, {"run.output_dir": str(out), "run.resume": "auto"})).train()
