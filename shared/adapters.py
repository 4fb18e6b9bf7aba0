"""A LoRA adapter's files and folding one into a transformer: the one home of both for `flux-sample --lora`
(sample/resolve.py finds the adapter, sample/run.py merges it) and `flux-prep lora merge`.

An adapter is peft's save_pretrained folder (adapter_config.json + adapter_model.safetensors), or one
safetensors file: diffusers' layout (a trainer's final/ and checkpoints hold pytorch_lora_weights.safetensors,
keys under "transformer.", older ones unprefixed) or kohya's names of BFL's layout (what `flux-prep export
--format comfyui` writes), which the family's diffusers pipeline converts (lora_state_dict). The merge is
the libraries': peft's merge_and_unload, diffusers' fuse_lora; `scale` multiplies the adapter's delta
(diffusers' lora_scale: each peft layer's scale_layer). The trainer's adapter kinds (train/adapters.py) are
all in its one file layout, the peft config (so the kind) in the metadata: diffusers' loader reads LoRA,
DoRA and LoKr; LoHa is read and merged through peft itself (read_adapter, fuse_peft_adapter).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .run_files import LORA_PREFIX
from .sampling import fuse_lora_adapter

KOHYA_MARKERS = ("lora_unet_", ".lora_down.weight")   # kohya's names (sd-scripts, musubi-tuner, our export)


@dataclass
class LoraSource:
    kind: str          # "peft" (PeftModel.save_pretrained), "diffusers" (save_lora_adapter, the trainer's) or
    #                    "kohya" (kohya's names of BFL's layout)
    folder: Path
    weight_name: str
    prefix: str | None = None   # diffusers: the keys' prefix ("transformer": FluxPipeline's layout; None: older)
    note: str = ""


def safetensors_lora(folder: Path, name: str) -> LoraSource:
    """The adapter in one safetensors file: kohya's names, or diffusers' with or without the "transformer."
    prefix (trainer adapters since FluxPipeline's layout carry it; older ones do not). Raises ValueError
    on a header that cannot be read."""
    from .bfl import read_shapes
    try:
        keys = read_shapes(folder / name)
    except Exception as e:  # noqa: BLE001 -- a corrupt header
        raise ValueError(f"{folder / name}: not a readable safetensors file ({str(e).splitlines()[0]})") from e
    if any(marker in k for k in keys for marker in KOHYA_MARKERS):
        return LoraSource("kohya", folder, name)
    prefixed = bool(keys) and all(k.startswith(f"{LORA_PREFIX}.") for k in keys)
    return LoraSource("diffusers", folder, name, LORA_PREFIX if prefixed else None)


def merge_adapter(model, source: LoraSource, family, scale: float = 1.0):
    """`model` (a transformer of `family`) with the adapter folded into its weights, `scale` times its delta;
    returns the model (peft's merge gives back the base module). Raises what the libraries raise for an
    adapter that does not fit the model."""
    if source.kind == "peft":
        from peft import PeftModel
        wrapped = PeftModel.from_pretrained(model, str(source.folder), is_trainable=False)
        if scale != 1.0:
            _scale_layers(wrapped, scale)
        return wrapped.merge_and_unload()
    if source.kind == "kohya":
        import diffusers
        pipeline = getattr(diffusers, family.lora_pipeline)
        state = pipeline.lora_state_dict(str(source.folder / source.weight_name))   # kohya -> diffusers' names
        model.load_lora_adapter(state, prefix=LORA_PREFIX)
        model.fuse_lora(lora_scale=scale)
        model.unload_lora()
    else:
        fuse_lora_adapter(model, str(source.folder), source.weight_name, source.prefix, scale)
    return model


def _scale_layers(model, scale: float) -> None:
    """What diffusers' fuse_lora(lora_scale=...) does to each adapter layer before merging."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.scale_layer(scale)


LORA_METADATA = "lora_adapter_metadata"   # diffusers' metadata key for the adapter's peft config


def read_adapter(path, prefix: str | None = LORA_PREFIX, tensors: bool = True) -> tuple[dict, dict]:
    """(peft's state dict without `prefix` ({} unless `tensors`), its peft config ({} when the file has none:
    older finals))."""
    from safetensors import safe_open
    lead = f"{prefix}." if prefix else ""
    with safe_open(str(path), framework="pt") as f:
        state = {k.removeprefix(lead): f.get_tensor(k) for k in f.keys()} if tensors else {}
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


def fuse_peft_adapter(model, state: dict, config: dict, scale: float = 1.0) -> None:
    """Merge the adapter into `model`'s weights, `scale` times its delta (each peft layer's own scale_layer
    and merge, as diffusers' fuse_lora does), and drop its layers: for the kinds diffusers' loader does not
    read (LoHa)."""
    from diffusers.utils.peft_utils import recurse_remove_peft_layers
    from peft.tuners.tuners_utils import BaseTunerLayer
    inject_adapter(model, state, config)
    if scale != 1.0:
        _scale_layers(model, scale)
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    recurse_remove_peft_layers(model)
