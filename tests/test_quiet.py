"""shared drops torchao's import-time noise, and only that."""
import importlib.util
import logging
import os
import subprocess
import sys

import pytest

import shared  # noqa: F401 - attaches the filters


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao (the fp8 extra) not installed")
def test_importing_diffusers_models_prints_no_torchao_noise():
    code = "import shared; from diffusers import AutoencoderKL, FluxTransformer2DModel; print('ok')"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "ok"
    for noise in ("Failed to load", "Unable to import `torchao`", "Enum subclass"):
        assert noise not in run.stderr, run.stderr


def test_other_warnings_of_the_same_loggers_still_show(caplog):
    with caplog.at_level(logging.WARNING):
        logging.getLogger("torchao").warning("Failed to load /x/_C.so: no such file")
        logging.getLogger("torchao").warning("float8 scale overflow")
        logging.getLogger("diffusers.quantizers.torchao.torchao_quantizer").warning(
            "Unable to import `torchao` Tensor objects. This may affect loading")
    assert [r.getMessage() for r in caplog.records] == ["float8 scale overflow"]


def _stderr(args: list[str], cwd) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stderr


BAR = "it/s]"   # what every tqdm bar of the libraries draws, whatever its description


def test_no_progress_leaves_no_bar_of_the_libraries_underneath(tmp_path):
    """Each command in a process of its own: the libraries' bar switches are per process, so a check in this
    one would see whatever an earlier test left."""
    from preprocess.demo import write_demo_shards
    write_demo_shards(tmp_path / "raw", num_samples=4, size=16)
    made = _stderr(["preprocess", "tiny-model", "tiny"], tmp_path)   # always quiet: a toy model writes in moments
    assert "Writing model shards" not in made and BAR not in made, made
    assert "requires torchvision" not in made, made
    encode = ["preprocess", "encode", "--model", "tiny", "--input", "raw", "--resolution", "16", "--t5-mode",
              "trimmed", "--t5-max-length", "8", "--batch-size", "4", "--num-workers", "0", "--device", "cpu"]
    shown = _stderr(encode + ["--output", "shown"], tmp_path)     # the bars --no-progress must remove
    assert "Loading weights" in shown and BAR in shown and "4/4 [" in shown, shown
    quiet = _stderr(encode + ["--output", "quiet", "--no-progress"], tmp_path)
    assert "Loading weights" not in quiet and BAR not in quiet and "img/s]" not in quiet, quiet
    sampled = _stderr(["sample", "--model", "tiny", "--prompt", "a red circle", "--steps", "1", "--width", "16",
                       "--height", "16", "--output", "out", "--no-progress"], tmp_path)
    assert "Loading" not in sampled and BAR not in sampled and "step/s]" not in sampled, sampled
    assert (tmp_path / "out").is_dir()


def test_casting_a_diffusers_model_says_nothing_of_float32_modules_it_has_not(tiny_model):
    """diffusers warns at every `model.to(dtype)` (each sample render) that modules should be kept in float32,
    listing none; that one message is dropped, and a list that names modules still shows."""
    import torch

    from shared.family import load_transformer
    logger = logging.getLogger("diffusers.models.modeling_utils")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        load_transformer(str(tiny_model)).to(torch.float32)
        logger.warning("There are modules in FluxTransformer2DModel that should be kept in float32: ['norm']. "
                       "Casting directly with `to()` can lead to inconsistent results")
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage()[:70] for r in records] == [
        "There are modules in FluxTransformer2DModel that should be kept in flo"]
    assert "['norm']" in records[0].getMessage()
