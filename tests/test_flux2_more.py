"""FLUX.2 [klein] through the trainer's other paths on the tiny folder (CPU): a LoRA with an EMA stopped and
resumed; full weights exported as one BFL file that diffusers' own single-file loader reads, and as a
diffusers folder its from_pretrained reads. The FSDP2 run is in tests/test_flux2_fsdp.py."""
from __future__ import annotations

import pytest
import torch
from flux2_runs import invoke, train
from safetensors.torch import load_file
from train_caches import read_metrics

from preprocess.cli import app as prep_app
from shared.run_files import LORA_WEIGHTS, TRANSFORMER_WEIGHTS

EMA_ADAPTER = f"ema/{LORA_WEIGHTS}"


def lora_ema_config(model, cache, out, **extra):
    from train.config import load_config
    return load_config(None, {"model.name": str(model), "data.train_cache": str(cache), "data.batch_size": 4,
                              "data.num_workers": 1, "run.output_dir": str(out), "run.max_steps": 3,
                              "run.checkpoint_every": 2, "run.log_every": 1, "run.tensorboard": False,
                              "run.progress": False, "run.deterministic": True, "flow.guidance_dropout": 0.2,
                              "lora.rank": 4, "ema.decay": 0.6, "optim.lr": 0.1, **extra})


def losses(run) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in read_metrics(run) if "loss" in m]


def test_lora_with_ema_stopped_after_step_2_resumes_exactly(tiny_flux2_klein, klein_cache, tmp_path):
    from train.loop import Trainer
    from train.loop import train as run_trainer
    run_trainer(lora_ema_config(tiny_flux2_klein, klein_cache, tmp_path / "full"))
    run_trainer(lora_ema_config(tiny_flux2_klein, klein_cache, tmp_path / "cut"), stop_after_step=2)
    assert not (tmp_path / "cut/final").exists() and (tmp_path / "cut/checkpoints/step-2").is_dir()
    batches = []   # the resumed run trains step 3 only: it starts from the checkpoint, not afresh
    Trainer(lora_ema_config(tiny_flux2_klein, klein_cache, tmp_path / "cut", **{"run.resume": "auto"})).train(
        on_batch=batches.append)
    assert len(batches) == 1
    assert losses(tmp_path / "cut") == losses(tmp_path / "full") and len(losses(tmp_path / "full")) == 3
    for name in (LORA_WEIGHTS, EMA_ADAPTER):
        resumed, whole = load_file(tmp_path / "cut/final" / name), load_file(tmp_path / "full/final" / name)
        assert set(resumed) == set(whole) and len(whole) > 0
        assert all(torch.equal(resumed[k], whole[k]) for k in whole), name
    last, ema = load_file(tmp_path / "full/final" / LORA_WEIGHTS), load_file(tmp_path / "full/final" / EMA_ADAPTER)
    ups = [k for k in last if "lora_B" in k]   # B starts at zero: it moved, and the EMA is not the last adapter
    assert min(last[k].abs().max() for k in ups) > 1e-3
    assert all(not torch.equal(ema[k], last[k]) for k in ups)


@pytest.fixture(scope="module")
def klein_full(tiny_flux2_klein, klein_cache, tmp_path_factory):
    """final/ of a 1-step full-weights run from random weights (so it differs from the folder's)."""
    run = train(tmp_path_factory.mktemp("full") / "run", tiny_flux2_klein, klein_cache, "--model.init", "random",
                "--run.max_steps", 1, "--run.precision", "no")
    return run / "final"


def assert_is_final(state: dict, final, folder) -> None:
    trained = load_file(final / TRANSFORMER_WEIGHTS)
    base = load_file(folder / "transformer" / TRANSFORMER_WEIGHTS)
    assert set(state) == set(trained) == set(base)
    assert all(torch.equal(state[k], trained[k]) for k in trained)
    assert all(not torch.equal(trained[k], base[k]) for k in trained if k.endswith("to_q.weight"))


def test_bfl_export_is_read_by_diffusers_single_file_loader(tiny_flux2_klein, klein_full, tmp_path):
    """diffusers detects a FLUX.2 BFL file by single_stream_modulation.lin.weight and converts it by names
    and chunks (no width written in), so it reads the toy size; the config (no hub offline) is the folder's."""
    from diffusers import Flux2Transformer2DModel
    file = tmp_path / "klein.safetensors"
    invoke(prep_app, "export", klein_full, "--format", "bfl", "--output", file)
    model = Flux2Transformer2DModel.from_single_file(str(file), config=str(tiny_flux2_klein), subfolder="transformer",
                                                     torch_dtype=torch.float32)
    assert_is_final(model.state_dict(), klein_full, tiny_flux2_klein)


def test_diffusers_export_loads_with_from_pretrained(tiny_flux2_klein, klein_full, tmp_path):
    from diffusers import Flux2Transformer2DModel
    out = tmp_path / "exported"
    invoke(prep_app, "export", klein_full, "--format", "diffusers", "--output", out)
    model = Flux2Transformer2DModel.from_pretrained(str(out), torch_dtype=torch.float32)
    assert_is_final(model.state_dict(), klein_full, tiny_flux2_klein)
    assert (out / "flux_prep.json").read_text() == (klein_full / "flux_prep.json").read_text()
