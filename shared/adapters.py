"""A LoRA adapter's files and folding one into a transformer: the one home of both for `flux-sample --lora`
(sample/resolve.py finds the adapter, sample/run.py merges it) and `flux-prep lora merge`.

An adapter is peft's save_pretrained folder (adapter_config.json + adapter_model.safetensors), or one
safetensors file: diffusers' layout (a trainer's final/ and checkpoints hold pytorch_lora_weights.safetensors,
keys under "transformer.", older ones unprefixed) or kohya's names of BFL's layout (what `flux-prep export
--format comfyui` writes), which the family's diffusers pipeline converts (lora_state_dict). The merge is
the libraries': peft's merge_and_unload, diffusers' fuse_lora; `scale` multiplies the adapter's delta
(diffusers' lora_scale: each peft layer's scale_layer). Another adapter kind (LoKr, LoHa, DoRA) is one
more case of `merge_adapter` where the libraries merge it.
"""
from __future__ import annotations

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
