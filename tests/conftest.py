"""Shared fixtures: the tiny model folder and the demo data, built once per test session, offline."""
import os
import sys

# The suite runs as `.venv/bin/python -m pytest` without an activated venv: put that venv's console
# scripts (accelerate, flux-prep, flux-sample, dvc) first on PATH so subprocess tests find them.
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread per process, here and in every subprocess and DataLoader worker: the tiny models gain
# nothing from more, and on a 2-core machine a test's processes spinning 2 OpenMP threads each ran the trainer
# tests about 5x slower (tests/test_train_memory.py's resume and swap tests: 202 s with the default, 43 s).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

# The longest test (a full `dvc repro` of the demo, about 4 minutes) first, so that the other worker runs the rest
# beside it rather than after it (pytest-xdist hands out whole files in collection order: pyproject's addopts).
FIRST = "tests/test_pipeline_demo.py"


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: not item.nodeid.startswith(FIRST))   # stable: the rest keep their order


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny FLUX folder in diffusers' layout (random weights, seed 0)."""
    from shared.tiny import write_tiny_model
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_kontext(tmp_path_factory):
    """A tiny FLUX.1 Kontext folder (FluxKontextPipeline, guidance embedding; pooling VAE, seed 0)."""
    from shared.tiny import write_tiny_kontext
    return write_tiny_kontext(tmp_path_factory.mktemp("tiny_kontext") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_flux2_klein(tmp_path_factory):
    """A tiny FLUX.2 [klein] folder (Flux2KleinPipeline, base: is_distilled false; pooling VAE, seed 0)."""
    from shared.tiny_flux2 import write_tiny_flux2_klein
    return write_tiny_flux2_klein(tmp_path_factory.mktemp("tiny_flux2") / "klein", seed=0)


@pytest.fixture(scope="session")
def klein_cache(tiny_flux2_klein, tmp_path_factory):
    """The demo images and sample prompt encoded by the tiny [klein] folder (tests/flux2_runs.py)."""
    from flux2_runs import encode_klein_cache
    return encode_klein_cache(tiny_flux2_klein, tmp_path_factory.mktemp("klein"))


@pytest.fixture(scope="session")
def tiny_flux2_dev(tmp_path_factory):
    """A tiny FLUX.2 [dev] folder (Flux2Pipeline, guidance embedding; pooling VAE, seed 0)."""
    from shared.tiny_flux2 import write_tiny_flux2_dev
    return write_tiny_flux2_dev(tmp_path_factory.mktemp("tiny_flux2") / "dev", seed=0)


@pytest.fixture(scope="session")
def s3_server():
    """One S3-compatible server (moto) on 127.0.0.1 for the session, its endpoint and credentials in the
    environment (as boto and s3fs read them) while it runs; started by the first test that asks."""
    from s3_server import S3Server
    server = S3Server()
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    yield server
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket on the session's server for this test: its s3:// URL."""
    import re
    import uuid
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:40].strip("-")
    return s3_server.bucket(f"{name}-{uuid.uuid4().hex[:8]}")


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Accelerate's state is one per process, fixed by the first Accelerator: each test starts without
    one, so that tests may train in bf16 autocast and in fp32 side by side."""
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
