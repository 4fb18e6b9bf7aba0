"""flux-sample on a trainer's intermediate checkpoints/step-N/: full weights (--transformer) and LoRA (--lora)
give what final/ gives at the same step, and a checkpoint it cannot read is refused in one line."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image
from train_caches import tiny_config, write_cache
from typer.testing import CliRunner

from sample.cli import app
from train.loop import train

PROMPT = "a red circle on a blue background"
FAST = ["--prompt", PROMPT, "--seed", 1, "--steps", 2, "--width", 32, "--height", 32, "--no-progress"]


def flux_sample(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def pixels(folder):
    return np.asarray(Image.open(next(folder.glob("0000-*.png"))).convert("RGB")).astype(np.int16)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_cache(tmp_path_factory.mktemp("cache") / "train", 8)


def _run(tmp_path, cache, **overrides):
    """A 2-step run that checkpoints at step 2 and ends there: the checkpoint and final/ hold the same weights."""
    train(tiny_config(tmp_path, cache, **{"run.max_steps": 2, "run.checkpoint_every": 2, **overrides}))
    return tmp_path / "run"


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, cache, tiny_model):
    return _run(tmp_path_factory.mktemp("full"), cache, **{"model.name": str(tiny_model), "ema.decay": 0.9})


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, cache, tiny_model):
    return _run(tmp_path_factory.mktemp("lora"), cache, **{"model.name": str(tiny_model), "model.init": "pretrained",
                                                           "lora.rank": 4, "run.precision": "bf16"})


def test_full_weight_checkpoint_samples_like_final(full_run, tiny_model, tmp_path):
    step = full_run / "checkpoints/step-2"
    info = json.loads((step / "flux_prep.json").read_text())
    assert info["text_mode"] == "trimmed" and info["steps_trained"] == 2 and info["ema"] is False
    assert info["renders_in"] == ["flux-sample"] and "FluxPipeline" in info["renders_note"]   # not diffusers, ComfyUI
    r = flux_sample("--model", tiny_model, "--transformer", step, "--output", tmp_path / "ckpt", *FAST)
    assert r.exit_code == 0, r.output
    assert "sampling the trained weights; its EMA (decay 0.9) is in final/ema/" in r.output
    r = flux_sample("--model", tiny_model, "--transformer", full_run / "final", "--output", tmp_path / "final", *FAST)
    assert r.exit_code == 0, r.output
    assert np.array_equal(pixels(tmp_path / "ckpt"), pixels(tmp_path / "final"))
    r = flux_sample("--model", tiny_model, "--output", tmp_path / "base", *FAST)   # the untrained transformer
    assert np.abs(pixels(tmp_path / "ckpt") - pixels(tmp_path / "base")).max() > 0


def test_lora_checkpoint_samples_like_final(lora_run, tiny_model, tmp_path):
    step = lora_run / "checkpoints/step-2"
    r = flux_sample("--model", tiny_model, "--lora", step, "--output", tmp_path / "ckpt", *FAST)
    assert r.exit_code == 0, r.output
    r = flux_sample("--model", tiny_model, "--lora", lora_run / "final", "--output", tmp_path / "final", *FAST)
    assert r.exit_code == 0, r.output
    assert np.array_equal(pixels(tmp_path / "ckpt"), pixels(tmp_path / "final"))


def _copy(step, tmp_path, name="step-2"):
    out = tmp_path / "run/checkpoints" / name
    shutil.copytree(step, out)
    return out


def _sharded(step, tmp_path):
    out = _copy(step, tmp_path)
    (out / "pytorch_model_fsdp_0").mkdir()
    (out / "model.safetensors").unlink()
    return out


def _old_lora(step, tmp_path):
    out = _copy(step, tmp_path)
    (out / "pytorch_lora_weights.safetensors").rename(out / "lora_adapter.safetensors")
    return out


def _unfinished(step, tmp_path):
    out = _copy(step, tmp_path, "step-2.tmp")
    (out / "trainer_state.json").unlink()
    return out


BAD = {
    "LoRA checkpoint as transformer": ("lora", "--transformer", lambda s, t: s, "pass it with --lora"),
    "full checkpoint as LoRA": ("full", "--lora", lambda s, t: s, "pass it with --transformer"),
    "sharded": ("full", "--transformer", _sharded, "a sharded checkpoint (FSDP"),
    "old LoRA checkpoint": ("lora", "--lora", _old_lora, "written before checkpoints held a loadable adapter"),
    "unfinished": ("full", "--transformer", _unfinished, "an incomplete checkpoint"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_unreadable_checkpoint_one_line_error(case, full_run, lora_run, tiny_model, tmp_path):
    which, flag, make, expected = BAD[case]
    step = make((full_run if which == "full" else lora_run) / "checkpoints/step-2", tmp_path)
    r = flux_sample("--model", tiny_model, flag, step, "--output", tmp_path / "out", *FAST)
    lines = [ln for ln in r.output.splitlines() if ln.startswith("flux-sample: error:")]
    assert r.exit_code == 2 and len(lines) == 1 and expected in lines[0], r.output
    assert not (tmp_path / "out").exists()
