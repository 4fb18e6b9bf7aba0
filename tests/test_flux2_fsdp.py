"""A FLUX.2 [klein] LoRA with an EMA under FSDP2 (configs/accelerate/fsdp.yaml: the blocks are the model's own
_no_split_modules) across 2 CPU processes over gloo: one process with the same global batch gives its
losses and adapters, and its final/ renders in flux-sample as in diffusers' Flux2KleinPipeline."""
import numpy as np
import pytest
import torch
from flux2_runs import flux_sample, pipeline_image
from safetensors.torch import load_file
from train_caches import read_metrics
from train_launcher import launch, same_global_batch, write_config

from shared.run_files import LORA_WEIGHTS
from train.config import load_config
from train.loop import train

pytestmark = pytest.mark.distributed

STEPS = 2


def test_fsdp2_klein_lora_trains_as_one_process_and_its_final_samples(tiny_flux2_klein, klein_cache, tmp_path):
    settings = {"model.name": str(tiny_flux2_klein), "lora.rank": 4, "ema.decay": 0.6, "optim.lr": 0.1}
    config = write_config(tmp_path / "two", klein_cache, None, settings, precision="bf16", max_steps=STEPS,
                          checkpoint_every=STEPS)
    two = launch(config)
    assert all((two / f"checkpoints/step-{STEPS}/pytorch_model_fsdp_0/__{rank}_0.distcp").is_file()
               for rank in (0, 1))   # sharded: each rank wrote its own part
    one = tmp_path / "one"
    train(load_config(config, {**same_global_batch(2), "run.output_dir": str(one)}))
    two_m, one_m = ([m for m in read_metrics(run) if "loss" in m] for run in (two, one))
    assert [m["step"] for m in two_m] == [m["step"] for m in one_m] == list(range(1, STEPS + 1))
    for a, b in zip(two_m, one_m):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
    for name in (LORA_WEIGHTS, f"ema/{LORA_WEIGHTS}"):
        two_a, one_a = load_file(two / "final" / name), load_file(one / "final" / name)
        assert set(two_a) == set(one_a) and len(one_a) > 0
        for k in one_a:
            torch.testing.assert_close(two_a[k], one_a[k], rtol=0, atol=1e-4, msg=f"{name} {k}")

    from diffusers import Flux2KleinPipeline
    ours = flux_sample(tmp_path / "sample", tiny_flux2_klein, "--lora", two / "final")
    pipe = Flux2KleinPipeline.from_pretrained(str(tiny_flux2_klein))
    base = pipeline_image(pipe, guidance_scale=4.0)
    pipe.load_lora_weights(str(two / "final"))   # the gathered final/ as diffusers reads a LoRA
    assert np.abs(ours - pipeline_image(pipe, guidance_scale=4.0)).mean() <= 1
    assert np.abs(ours - base).mean() > 1   # the adapter changed the image: the comparison can fail
