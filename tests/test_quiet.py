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
