"""`flux-prep lora merge`: a LoRA adapter folded into its base's weights, written in the base's layout.

BASE is a model folder in diffusers' layout (its transformer/), a transformer folder, or one .safetensors
file in Black Forest Labs' layout (FLUX.1 or FLUX.2, shared/bfl*.py). The merged transformer is written as
a transformer folder (config.json + diffusion_pytorch_model.safetensors + flux_prep.json: what
`flux-sample --model BASE --transformer OUT` and `flux-prep export` read; the text encoders and VAE are
BASE's, not copied) or, for a BFL file, as one BFL file again (its own key prefix and metadata kept).
The merge runs in float32 (the libraries' merge: shared/adapters.py) and is stored in the base's dtype.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from shared.adapters import LoraSource, merge_adapter, safetensors_lora
from shared.family import FAMILIES, Family, family_of_transformer, get_family
from shared.run_files import LORA_WEIGHTS, PEFT_CONFIG, PEFT_WEIGHTS, TRAINING_INFO, read_training_info

from .export import ExportError, _write_file, replace_folder

DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def find_adapter(adapter: Path) -> LoraSource:
    """The adapter at `adapter`: peft's folder, a folder with the trainer's file (final/, checkpoints/step-N/),
    or one safetensors file (diffusers' or kohya's names)."""
    if adapter.is_file() and adapter.suffix == ".safetensors":
        return _lora_file(adapter.parent, adapter.name)
    if not adapter.is_dir():
        raise ExportError(f"{adapter}: no such LoRA adapter (a folder, or one .safetensors file)")
    if (adapter / PEFT_CONFIG).is_file() and (adapter / PEFT_WEIGHTS).is_file():
        return LoraSource("peft", adapter, PEFT_WEIGHTS)
    if (adapter / LORA_WEIGHTS).is_file():
        return _lora_file(adapter, LORA_WEIGHTS)
    raise ExportError(f"{adapter}: no LoRA weights ({PEFT_WEIGHTS} + {PEFT_CONFIG}, or {LORA_WEIGHTS})")


def _lora_file(folder: Path, name: str) -> LoraSource:
    try:
        return safetensors_lora(folder, name)
    except ValueError as e:
        raise ExportError(str(e)) from None


def bfl_family(shapes: dict) -> Family:
    """The family whose BFL layout `shapes` are (each family's config_from_shapes reads them or refuses)."""
    for family in FAMILIES.values():
        try:
            family.bfl().config_from_shapes(shapes)
            return family
        except (ValueError, KeyError):
            continue
    raise ExportError("not a FLUX.1 or FLUX.2 transformer in Black Forest Labs' key layout")


def transformer_folder(base: Path) -> Path:
    """A model folder's transformer/, or `base` itself when it is a transformer folder."""
    if (base / "transformer" / "config.json").is_file():
        return base / "transformer"
    if (base / "config.json").is_file():
        return base
    raise ExportError(f"{base}: neither a model folder (transformer/config.json) nor a transformer folder "
                      "(config.json)")


def stored_dtypes(path: Path) -> dict[str, torch.dtype]:
    """Each tensor's dtype in a safetensors file, from its header."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return {k: DTYPES.get(f.get_slice(k).get_dtype(), torch.float32) for k in f.keys()}


def merge(base: Path, adapter: Path, out: Path, scale: float = 1.0, overwrite: bool = False) -> str:
    """Write BASE with ADAPTER folded in to OUT; returns a line saying what was written."""
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise ExportError(f"{out}: exists; pass --overwrite to replace it")
    source = find_adapter(adapter)
    info = read_training_info(source.folder)
    if base.is_file():
        family = _merge_bfl(base, source, info, out, scale)
    elif base.is_dir():
        family = _merge_folder(base, source, info, out, scale)
    else:
        raise ExportError(f"{base}: no such model folder or file")
    return f"wrote {out}: {family.name} transformer with {adapter} merged (scale {scale:g})"


def _check_family(family: Family, info: dict, adapter: Path) -> None:
    """An adapter whose flux_prep.json names another family is refused before anything is loaded."""
    theirs = info.get("family")
    if theirs and get_family(theirs) is not family:
        raise ExportError(f"{adapter} is a {theirs} adapter; the base is a {family.name} transformer")


def _merged(model, source: LoraSource, family: Family, scale: float):
    try:
        return merge_adapter(model, source, family, scale).eval()
    except Exception as e:  # noqa: BLE001 -- an adapter of another model: one line, not a trace
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise ExportError(f"{source.folder}: cannot merge the LoRA adapter into this base ({msg})") from e


def merged_info(info: dict, adapter: Path, base: Path, scale: float) -> dict:
    """The merged model's flux_prep.json: the adapter's conventions (how it is prompted and sampled), no LoRA."""
    return {**info, "lora": None, "merged": {"base": str(base), "adapter": str(adapter), "scale": scale}}


def _merge_folder(base: Path, source: LoraSource, info: dict, out: Path, scale: float) -> Family:
    from shared.family import load_transformer
    folder = transformer_folder(base)
    family = family_of_transformer(json.loads((folder / "config.json").read_text()))
    if family is None:
        raise ExportError(f"{folder}: its config names no FLUX transformer class flux-prep knows")
    _check_family(family, info, source.folder)
    dtype = next(iter(stored_dtypes(next(folder.glob("*.safetensors"))).values()))
    model = _merged(load_transformer(str(folder), torch.float32, part=None), source, family, scale)
    model.to(dtype)
    base_info = read_training_info(folder)

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp), safe_serialization=True)
        merged = merged_info(info or base_info, source.folder, base, scale)
        (tmp / TRAINING_INFO).write_text(json.dumps(merged, indent=2, sort_keys=True))
    replace_folder(out, write)
    return family


def _merge_bfl(base: Path, source: LoraSource, info: dict, out: Path, scale: float) -> Family:
    from safetensors import safe_open

    from shared.bfl import PREFIX, read_shapes
    if base.suffix != ".safetensors" or out.suffix != ".safetensors":
        raise ExportError(f"{base}: a single-file base is a .safetensors file in BFL's layout, and so is the "
                          f"output (name it *.safetensors, not {out.name})")
    try:
        shapes = read_shapes(base)
    except Exception as e:  # noqa: BLE001 -- a corrupt header
        raise ExportError(f"{base}: not a readable safetensors file ({str(e).splitlines()[0]})") from e
    family = bfl_family(shapes)
    _check_family(family, info, source.folder)
    bfl = family.bfl()
    try:
        model = bfl.load_bfl_transformer(base, None, torch.float32, "cpu")
    except ValueError as e:
        raise ExportError(f"{base}: {e}") from None
    state = bfl.diffusers_to_bfl(_merged(model, source, family, scale).state_dict())
    prefix = PREFIX if all(k.startswith(PREFIX) for k in shapes) else ""   # ComfyUI's prefix, kept
    dtypes = stored_dtypes(base)
    tensors = {prefix + k: v.to(dtypes.get(prefix + k, v.dtype)) for k, v in state.items()}
    with safe_open(str(base), framework="pt") as f:
        metadata = dict(f.metadata() or {})
    metadata["flux_prep"] = json.dumps(merged_info(info, source.folder, base, scale), sort_keys=True)
    _write_file(out, tensors, metadata)
    return family

