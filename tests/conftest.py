"""Shared fixtures: the tiny model folder and the demo data, built once per test session, offline."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny FLUX folder in diffusers' layout (random weights, seed 0)."""
    from shared.tiny import write_tiny_model
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)
