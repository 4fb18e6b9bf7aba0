"""A trainer adapter file read and merged through peft itself, whatever its kind (peft's LoRA, DoRA, LoKr,
LoHa): the file holds peft's state dict under diffusers' "transformer." prefix and the peft config in its
metadata (train/checkpoint.py writes it). diffusers' loader reads LoRA, DoRA and LoKr; LoHa goes this way."""
from __future__ import annotations

import json

from .run_files import LORA_PREFIX

LORA_METADATA = "lora_adapter_metadata"   # diffusers' metadata key for the adapter's peft config


def read_adapter(path, prefix: str | None = LORA_PREFIX) -> tuple[dict, dict]:
    """(peft's state dict without `prefix`, its peft config ({} when the file has none: older finals))."""
    from safetensors import safe_open
    lead = f"{prefix}." if prefix else ""
    with safe_open(str(path), framework="pt") as f:
        state = {k.removeprefix(lead): f.get_tensor(k) for k in f.keys()}
        meta = f.metadata() or {}
    config = json.loads(meta[LORA_METADATA]) if LORA_METADATA in meta else {}
    return state, {k.removeprefix(lead): v for k, v in config.items()}


def peft_config_of(config: dict):
    """The peft config object of a saved config dict (its peft_type picks the class)."""
    import dataclasses

    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    cls = PEFT_TYPE_TO_CONFIG_MAPPING[config.get("peft_type", "LORA")]
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    return cls(**{k: v for k, v in config.items() if k in known and k != "peft_type"})


def inject_adapter(model, state: dict, config: dict, name: str = "default") -> None:
    """Add the adapter to `model` (peft's inject_adapter_in_model) and load its weights, refusing any left over."""
    from peft import inject_adapter_in_model
    from peft.utils import set_peft_model_state_dict
    inject_adapter_in_model(peft_config_of(config), model, adapter_name=name)
    result = set_peft_model_state_dict(model, state, adapter_name=name)
    if result.unexpected_keys:
        raise ValueError(f"adapter tensors that match no layer of the model: {result.unexpected_keys[:3]}")


def fuse_peft_adapter(model, state: dict, config: dict) -> None:
    """Merge the adapter into `model`'s weights (each peft layer's own merge) and drop its layers."""
    from diffusers.utils.peft_utils import recurse_remove_peft_layers
    from peft.tuners.tuners_utils import BaseTunerLayer
    inject_adapter(model, state, config)
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    recurse_remove_peft_layers(model)
