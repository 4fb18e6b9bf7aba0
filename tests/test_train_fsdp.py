"""The trainer under FSDP2 (accelerate with configs/accelerate/fsdp.yaml) across 2 CPU processes over
gloo, full training with an EMA and gradient accumulation: the losses, weights and EMA of one process
with the same global batch, final/ equal to the gathered shards, and a SIGKILL after a checkpoint
resumed to the uninterrupted run's losses, weights and EMA. LoRA: test_train_fsdp_lora.py."""
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
ACCUM = 2   # micro-batches per step and process: FSDP reduce-scatters each one (train/fsdp.py)
EMA_FILE = "ema/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """(config, run folder) of a 2-process FSDP2 run with an EMA: 4 steps of 2 micro-batches, a sharded
    checkpoint every 2."""
    root = tmp_path_factory.mktemp("fsdp")
    cache = write_cache(root / "train", 32, rows_per_shard=8, row_group_rows=2)
    val = write_cache(root / "val", 4, seed=9, prefix="val")
    config = write_config(root / "a", cache, val, {"ema.decay": 0.6}, max_steps=STEPS, grad_accum=ACCUM,
                          checkpoint_every=2, keep_checkpoints=2)
    return config, launch(config)


def train_losses(run_dir) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in read_metrics(run_dir) if "loss" in m]


def final_weights(run_dir, name="diffusion_pytorch_model.safetensors") -> dict:
    return load_file(run_dir / "final" / name)


def test_two_fsdp2_processes_train_as_one_process_with_their_global_batch(fsdp_run, tmp_path):
    config, run = fsdp_run
    # FSDP2 ran: the checkpoint holds each rank's shards (DCP files) of the model and the EMA, no
    # whole-model file, no EMA pickled by one rank.
    for part in ("pytorch_model_fsdp_0", "ema"):
        folder = run / f"checkpoints/step-{STEPS}" / part
        assert (folder / "__0_0.distcp").is_file() and (folder / "__1_0.distcp").is_file()
    assert not (run / f"checkpoints/step-{STEPS}/model.safetensors").exists()
    assert not (run / f"checkpoints/step-{STEPS}/custom_checkpoint_1.pkl").exists()

    one = tmp_path / "one"
    train(load_config(config, {**same_global_batch(2, ACCUM), "run.output_dir": str(one)}))
    two_m = [m for m in read_metrics(run) if "loss" in m]
    one_m = [m for m in read_metrics(one) if "loss" in m]
    assert [m["step"] for m in two_m] == [m["step"] for m in one_m] == list(range(1, STEPS + 1))
    for a, b in zip(two_m, one_m):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5, abs=1e-6)
    val_two = [m["val/loss"] for m in read_metrics(run) if "val/loss" in m]
    val_one = [m["val/loss"] for m in read_metrics(one) if "val/loss" in m]
    assert val_two == pytest.approx(val_one, rel=1e-5) and len(val_two) >= 1

    # Rank 0 read the batches of the one process's first DataLoader worker, rank 1 those of its second,
    # which the one process takes in turn: 2 x ACCUM batches of 2 per step.
    ranks = [json.loads((run / f"seen/rank{r}.json").read_text()) for r in (0, 1)]
    batches = [[r["keys"][i:i + 2] for i in range(0, len(r["keys"]), 2)] for r in ranks]
    assert len(batches[0]) == STEPS * ACCUM
    in_turn = [k for pair in zip(*batches) for batch in pair for k in batch]
    assert json.loads((one / "seen/rank0.json").read_text())["keys"] == in_turn
    assert not set(ranks[0]["keys"]) & set(ranks[1]["keys"])
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]   # the gathered weights, on both ranks

    two_w, one_w = final_weights(run), final_weights(one)
    two_ema, one_ema = final_weights(run, EMA_FILE), final_weights(one, EMA_FILE)
    assert set(two_w) == set(one_w) == set(two_ema) == set(one_ema)
    for k in one_w:
        torch.testing.assert_close(two_w[k], one_w[k], rtol=1e-5, atol=1e-6, msg=k)
        torch.testing.assert_close(two_ema[k], one_ema[k], rtol=1e-5, atol=1e-6, msg=k)
    cfg = load_config(config)
    start = build_transformer(cfg.model, seed=cfg.run.seed).state_dict()
    moved = sum(not torch.equal(one_w[k], start[k]) for k in one_w)
    assert moved > len(one_w) // 2   # the runs trained: most tensors left their initial values
    averaged = sum(not torch.equal(two_ema[k], two_w[k]) and not torch.equal(two_ema[k], start[k]) for k in two_w)
    assert averaged > len(two_w) // 2   # the EMA is neither the last weights nor the first


def test_fsdp2_final_is_the_gathered_shards_and_loads_with_from_pretrained(fsdp_run, tmp_path):
    from accelerate.utils import merge_fsdp_weights
    from diffusers import FluxTransformer2DModel
    _, run = fsdp_run
    ckpt = run / f"checkpoints/step-{STEPS}"
    merge_fsdp_weights(str(ckpt / "pytorch_model_fsdp_0"), str(tmp_path / "merged"))
    shards = load_file(tmp_path / "merged/model.safetensors")
    for final, expected in (("final", shards), ("final/ema", gathered_ema(ckpt, tmp_path))):
        loaded = FluxTransformer2DModel.from_pretrained(run / final).state_dict()
        assert set(expected) == set(loaded) and len(expected) > 0
        assert all(torch.equal(expected[k], loaded[k]) for k in expected), final
        assert json.loads((run / final / "flux_prep.json").read_text())["steps_trained"] == STEPS


def gathered_ema(checkpoint, tmp_path) -> dict:
    """The EMA's DCP shards of a checkpoint, merged into whole tensors."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dcp_to_torch_save(str(checkpoint / "ema"), str(tmp_path / "ema.pt"))
    return torch.load(tmp_path / "ema.pt", weights_only=True)


def test_fsdp2_run_killed_after_a_checkpoint_resumes_to_the_same_losses_and_weights(fsdp_run, tmp_path):
    config, full = fsdp_run
    out = launch_and_kill(config, "checkpoints/step-2/trainer_state.json", **{"run.output_dir": str(tmp_path / "run")})
    assert not (out / "final").exists()
    launch(config, **{"run.output_dir": str(out), "run.resume": "auto"})
    assert train_losses(out) == train_losses(full)
    for name in ("diffusion_pytorch_model.safetensors", EMA_FILE):
        resumed, uninterrupted = final_weights(out, name), final_weights(full, name)
        assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted), name
    # Another number of processes is refused, naming both counts.
    with pytest.raises(ValueError, match="written by 2 processes, this run has 1"):
        Trainer(load_config(config, {"run.output_dir": str(out), "run.resume": "auto"})).train()
