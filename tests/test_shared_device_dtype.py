"""shared/precision.py and shared/devices.py: dtype names and device picking, one place for every stage."""
from __future__ import annotations

import pytest
import torch

from shared.cache.schema import dtype_name, torch_dtype
from shared.devices import DeviceError, resolve_device
from shared.precision import DTYPE_ALIASES, DTYPES, canonical_dtype, resolve_dtype

ALIASES = {"bf16": ("bfloat16", torch.bfloat16), "fp16": ("float16", torch.float16),
           "fp32": ("float32", torch.float32), "bfloat16": ("bfloat16", torch.bfloat16),
           "float16": ("float16", torch.float16), "float32": ("float32", torch.float32)}


@pytest.mark.parametrize("alias", list(ALIASES))
def test_dtype_aliases_map_to_canonical_names(alias):
    name, dt = ALIASES[alias]
    assert canonical_dtype(alias) == name
    assert resolve_dtype(alias) is dt
    assert torch_dtype(name) is dt and dtype_name(dt) == name   # the cache contract agrees


@pytest.mark.parametrize("bad", ["int8", "float64", "BF16", "", None])
def test_unknown_dtype_raises_naming_the_choices(bad):
    for fn in (canonical_dtype, resolve_dtype):
        with pytest.raises(ValueError, match="unknown dtype") as e:
            fn(bad)
        assert all(choice in str(e.value) for choice in DTYPE_ALIASES)


def test_dtype_tables_agree():
    assert set(DTYPE_ALIASES.values()) == set(DTYPES) and all(DTYPE_ALIASES[n] == n for n in DTYPES)


def _cuda(monkeypatch, count):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is here")
@pytest.mark.parametrize("spec", [None, "", "auto"])
def test_auto_device_is_cpu_on_this_machine(spec):
    assert resolve_device(spec) == torch.device("cpu")
    assert resolve_device(spec, local_rank=3) == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is here")
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_device_without_a_gpu_raises_a_clear_error(spec):
    with pytest.raises(DeviceError, match="no CUDA GPU is available"):
        resolve_device(spec)


@pytest.mark.parametrize("spec", ["cuda", "cuda:0"])
def test_cuda_device_without_a_gpu_raises_anywhere(monkeypatch, spec):
    _cuda(monkeypatch, 0)
    assert resolve_device("auto", 1) == torch.device("cpu")
    with pytest.raises(DeviceError, match=f"device '{spec}' asked for, but no CUDA GPU is available"):
        resolve_device(spec)
    with pytest.raises(ValueError):   # DeviceError is a ValueError: the encode CLI reports it in one line
        resolve_device(spec)


def test_cuda_device_is_this_ranks_gpu(monkeypatch):
    _cuda(monkeypatch, 4)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device(None, local_rank=2) == torch.device("cuda", 2)
    assert resolve_device("cuda", local_rank=3) == torch.device("cuda", 3)
    assert resolve_device("cuda:1", local_rank=3) == torch.device("cuda", 1)
    assert resolve_device("cpu", local_rank=3) == torch.device("cpu")
    with pytest.raises(DeviceError, match="only 4 CUDA GPU"):
        resolve_device("cuda:4")
    with pytest.raises(DeviceError, match="only 4 CUDA GPU"):
        resolve_device("cuda", local_rank=4)


@pytest.mark.parametrize("spec", ["gpu", "tpu9", "cuda:x"])
def test_unknown_device_raises_naming_the_choices(spec):
    with pytest.raises(DeviceError, match=f"unknown device '{spec}'; use auto, cpu, cuda or cuda:N"):
        resolve_device(spec)


def test_cpu_device_passes_through():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
