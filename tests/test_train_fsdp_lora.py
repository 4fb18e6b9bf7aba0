"""LoRA with an EMA under FSDP2 (configs/accelerate/fsdp.yaml) across 2 CPU processes over gloo, in bf16
(LoRA's base is bf16): the losses, adapter and EMA adapter of one process with the same global batch;
final/ gathered from the shards and loaded by `flux-sample --lora`; a SIGKILL after a checkpoint
resumed to the uninterrupted run's losses and adapters."""
import json

import pytest
import torch
from safetensors.torch import load_file
from train_caches import read_metrics, write_cache
from train_launcher import launch, launch_and_kill, same_global_batch, write_config

from train.config import load_config
from train.loop import train

pytestmark = pytest.mark.distributed

STEPS = 4
LORA = {"lora.rank": 4, "ema.decay": 0.6, "optim.lr": 1e-2,   # lr: an adapter that moves in 4 steps
        "model.init": "random", "lora.allow_random_base": True}   # the tiny preset has no published weights
ADAPTER, EMA_ADAPTER = "pytorch_lora_weights.safetensors", "ema/pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """(config, run folder) of a 2-process FSDP2 LoRA run with an EMA: 4 steps, a checkpoint every 2."""
    root = tmp_path_factory.mktemp("fsdp-lora")
    cache = write_cache(root / "train", 16, rows_per_shard=8, row_group_rows=2)
    config = write_config(root / "a", cache, None, LORA, precision="bf16", max_steps=STEPS, checkpoint_every=2,
                          keep_checkpoints=2)
    return config, launch(config)


def train_losses(run_dir) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in read_metrics(run_dir) if "loss" in m]


def adapter(run_dir, name=ADAPTER) -> dict:
    """A final adapter's tensors by the model's parameter names (the file's keys carry FluxPipeline's prefix)."""
    state = load_file(run_dir / "final" / name)
    assert state and all(k.startswith("transformer.") for k in state)
    return {k.removeprefix("transformer."): v for k, v in state.items()}


def test_fsdp2_lora_with_ema_trains_as_one_process_with_its_global_batch(lora_run, tmp_path):
    config, run = lora_run
    ckpt = run / f"checkpoints/step-{STEPS}"
    for part in ("pytorch_model_fsdp_0", "ema"):   # each rank's shards
        assert (ckpt / part / "__0_0.distcp").is_file() and (ckpt / part / "__1_0.distcp").is_file()

    one = tmp_path / "one"
    train(load_config(config, {**same_global_batch(2), "run.output_dir": str(one)}))
    two_m = [m for m in read_metrics(run) if "loss" in m]
    one_m = [m for m in read_metrics(one) if "loss" in m]
    assert [m["step"] for m in two_m] == [m["step"] for m in one_m] == list(range(1, STEPS + 1))
    for a, b in zip(two_m, one_m):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5, abs=1e-6)
    for name in (ADAPTER, EMA_ADAPTER):
        two_a, one_a = adapter(run, name), adapter(one, name)
        assert set(two_a) == set(one_a) and all("lora" in k for k in one_a)
        for k in one_a:
            torch.testing.assert_close(two_a[k], one_a[k], rtol=0, atol=1e-4, msg=f"{name} {k}")
    last, ema = adapter(run), adapter(run, EMA_ADAPTER)
    ups = [k for k in last if "lora_B" in k]   # B starts at zero (peft's gaussian init)
    assert min(last[k].abs().max() for k in ups) > 1e-2   # every B moved, by several learning rates
    assert all(not torch.equal(ema[k], last[k]) for k in ups)   # the average is not the last adapter


def test_fsdp2_lora_final_is_the_gathered_shards_and_loads_with_flux_sample(lora_run, tiny_model, tmp_path):
    from accelerate.utils import merge_fsdp_weights
    from typer.testing import CliRunner

    from sample.cli import app
    _, run = lora_run
    merge_fsdp_weights(str(run / f"checkpoints/step-{STEPS}/pytorch_model_fsdp_0"), str(tmp_path / "merged"))
    shards = {k.replace(".default", ""): v for k, v in load_file(tmp_path / "merged/model.safetensors").items()
              if "lora_" in k}
    final = adapter(run)
    assert set(final) == set(shards) and len(final) > 0
    assert all(torch.equal(final[k], shards[k]) for k in final)
    info = json.loads((run / "final/flux_prep.json").read_text())
    assert info["lora"]["rank"] == 4 and info["steps_trained"] == STEPS and not info["ema"]

    out = tmp_path / "samples"
    r = CliRunner().invoke(app, ["--model", str(tiny_model), "--lora", str(run / "final"), "--prompt", "a red circle",
                                 "--seed", "1", "--output", str(out), "--steps", "2", "--width", "32", "--height",
                                 "32", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert len(list(out.glob("*.png"))) == 1
    # What flux-sample merged into its transformer is this adapter: each weight moved by B @ A (alpha = rank).
    merged, base = sampling_weights(tiny_model, run / "final")
    pairs = [k.removesuffix(".lora_A.weight") for k in final if k.endswith(".lora_A.weight")]
    for module in pairs:
        delta = final[f"{module}.lora_B.weight"] @ final[f"{module}.lora_A.weight"]
        torch.testing.assert_close(merged[f"{module}.weight"] - base[f"{module}.weight"], delta,
                                   rtol=1e-4, atol=1e-6, msg=module)


def sampling_weights(model, lora_folder) -> tuple[dict, dict]:
    """The weights of flux-sample's transformer with the adapter merged, and without it (fp32)."""
    from sample.resolve import resolve_lora, resolve_transformer
    from shared.family.flux1 import FLUX1
    from sample.run import load_sampling_transformer
    source = resolve_transformer(FLUX1, str(model), None)
    lora, _ = resolve_lora(str(lora_folder))
    merged = load_sampling_transformer(source, lora, torch.float32, "cpu").state_dict()
    return merged, load_sampling_transformer(source, None, torch.float32, "cpu").state_dict()


def test_fsdp2_lora_run_killed_after_a_checkpoint_resumes_to_the_same_losses_and_adapters(lora_run, tmp_path):
    config, full = lora_run
    out = launch_and_kill(config, "checkpoints/step-2/trainer_state.json", **{"run.output_dir": str(tmp_path / "run")})
    assert not (out / "final").exists()
    launch(config, **{"run.output_dir": str(out), "run.resume": "auto"})
    assert train_losses(out) == train_losses(full)
    for name in (ADAPTER, EMA_ADAPTER):
        resumed, uninterrupted = adapter(out, name), adapter(full, name)
        assert set(resumed) == set(uninterrupted)
        assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted), name
