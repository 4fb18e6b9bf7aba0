"""`flux-prep export`: a trainer's final/ (LoRA or full weights) in the files other tools load.

  comfyui, bfl  one .safetensors file in Black Forest Labs' layout of the model's family (FLUX.1 or FLUX.2:
                shared/bfl*.py): the whole transformer (what ComfyUI's diffusion-model loader and BFL's own
                code read), or a LoRA in kohya's names (what ComfyUI, Forge, sd-scripts and musubi-tuner
                load; the family's diffusers pipeline reads it too). The two names give the same file:
                ComfyUI reads BFL's layout. A LoKr or LoHa adapter (lora.kind) is written in LyCORIS's
                layout instead (shared/lycoris.py), which ComfyUI loads too; DoRA exports as diffusers only.
  diffusers     a folder: the transformer (its class's from_pretrained), or the LoRA in the layout of the
                family's pipeline (FluxPipeline / Flux2KleinPipeline.load_lora_weights), an older final/'s
                unprefixed keys given the "transformer." prefix.

`--dtype bf16` casts every weight; `fp8` (full weights only) stores the linear layers' matrices as
float8 e4m3 (plain casts, as ComfyUI's fp8 checkpoints; it reads the dtype from the tensors) and the
rest in bf16. Outputs are written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from shared.cache.files import commit_file
from shared.family import Family, family_of_transformer, get_family
from shared.adapters import LORA_METADATA
from shared.run_files import (LORA_PREFIX, LORA_WEIGHTS, TRAINING_INFO, TRANSFORMER_WEIGHTS, read_training_info,
                              write_lora_weights)
from shared.safetensors_order import canonicalize_file

FORMATS = ("comfyui", "bfl", "diffusers")
DTYPES = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}
LORA_FILE, TRANSFORMER_FILE = LORA_WEIGHTS, TRANSFORMER_WEIGHTS
LYCORIS_KINDS = {"LOKR": "lokr", "LOHA": "loha"}   # peft_type -> LyCORIS's algo name (shared/lycoris.py)


class ExportError(Exception):
    """Bad input for flux-prep export; the message is the one line shown to the user."""


@dataclass
class Final:
    folder: Path
    info: dict
    lora: bool
    family: Family


def read_final(folder: Path) -> Final:
    if not folder.is_dir():
        raise ExportError(f"{folder}: no such folder (expected a trainer's final/)")
    if not (folder / TRAINING_INFO).is_file():
        raise ExportError(f"{folder}: not a trainer final/ folder (no {TRAINING_INFO})")
    info = read_training_info(folder)
    if (folder / LORA_FILE).is_file():   # a final/ written before families had names is FLUX.1's
        return Final(folder, info, lora=True, family=get_family(info.get("family")))
    if (folder / "config.json").is_file() and (folder / TRANSFORMER_FILE).is_file():
        family = family_of_transformer(json.loads((folder / "config.json").read_text()))
        if family is not None and info.get("family"):   # the run's own (Kontext shares FLUX.1's class)
            family = get_family(info["family"]) if get_family(info["family"]).transformer_class == \
                family.transformer_class else family
        return Final(folder, info, lora=False, family=family or get_family(info.get("family")))
    raise ExportError(f"{folder}: not a trainer final/ folder (neither {LORA_FILE} nor config.json + "
                      f"{TRANSFORMER_FILE})")


def export(final: Path, fmt: str, output: Path, dtype: str | None = None, overwrite: bool = False) -> Path:
    """Write `final` as `fmt` to `output`; returns `output`."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; choose bf16 or fp8")
    if fmt != "diffusers" and output.suffix != ".safetensors":
        raise ExportError(f"{output}: --format {fmt} writes one file; name it *.safetensors")
    if (output.exists() or output.is_symlink()) and not overwrite:
        raise ExportError(f"{output}: exists; pass --overwrite to replace it")
    src = read_final(final)
    if src.lora and dtype == "fp8":
        raise ExportError("--dtype fp8 is for full weights; a LoRA is small, export it in bf16 or as trained")
    if src.lora:
        _export_lora(src, fmt, output, dtype)
    else:
        _export_full(src, fmt, output, dtype)
    return output


def cast(state: dict, dtype: str | None) -> dict:
    """bf16: every floating tensor; fp8: 2-D weights in float8 e4m3 (refusing any beyond its range), the rest bf16."""
    if dtype is None:
        return state
    out = {}
    for k, v in state.items():
        if dtype == "fp8" and v.ndim == 2:
            peak = v.abs().max().item() if v.numel() else 0.0
            if peak > torch.finfo(torch.float8_e4m3fn).max:
                raise ExportError(f"{k}: a weight of {peak:g} is beyond float8 e4m3's range (448); export in bf16")
            out[k] = v.to(torch.float8_e4m3fn)
        else:
            out[k] = v.to(torch.bfloat16) if v.is_floating_point() else v
    return out


def modelspec(src: Final, output: Path, lora: bool) -> dict:
    """The sai model-spec fields that sd-scripts writes and ComfyUI and Forge show, plus the training info."""
    arch = src.family.modelspec_names["architecture"][bool(src.info.get("guidance_embeds"))]
    return {"format": "pt", "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": arch + ("/lora" if lora else ""),
            "modelspec.implementation": "https://github.com/black-forest-labs/flux",
            "modelspec.title": output.stem, "flux_prep": json.dumps(src.info, sort_keys=True)}


def read_lora(folder: Path) -> tuple[dict, dict]:
    """(peft's state dict without prefix, the adapter's peft config) of a trainer's LoRA file, either layout."""
    from shared.adapters import read_adapter
    state, config = read_adapter(folder / LORA_FILE, LORA_PREFIX)
    if not config:
        raise ExportError(f"{folder / LORA_FILE}: no {LORA_METADATA} (the adapter's rank and alpha)")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ExportError(f"{folder / LORA_FILE}: per-layer ranks or alphas are not exported")
    return state, config


def _export_lora(src: Final, fmt: str, output: Path, dtype: str | None) -> None:
    adapter, config = read_lora(src.folder)
    if fmt == "diffusers":
        def write(tmp: Path) -> None:
            write_lora_weights(src.family, tmp, cast(adapter, dtype), config)
        _write_folder(output, src, write)
        return
    if config.get("peft_type") in LYCORIS_KINDS:
        _export_lycoris(src, adapter, config, output, dtype)
        return
    if config.get("use_dora"):
        raise ExportError(f"{src.folder}: a DoRA adapter (lora.dora) has no exact form in kohya's LoRA file (ComfyUI "
                          "divides by the base weight's norm, peft's DoRA by the adapted weight's): export it with "
                          "--format diffusers")
    rank, alpha = int(config["r"]), float(config.get("lora_alpha") or config["r"])
    try:
        kohya = src.family.bfl_lora().peft_to_kohya(adapter, rank, alpha)
    except ValueError as e:
        raise ExportError(f"{src.folder}: {e}") from None
    kohya = {k: v if k.endswith(".alpha") else cast({k: v}, dtype)[k] for k, v in kohya.items()}
    names = src.family.modelspec_names
    meta = modelspec(src, output, lora=True) | {"ss_network_module": names["network_module"],
                                                "ss_network_dim": str(rank), "ss_network_alpha": f"{alpha:g}",
                                                "ss_base_model_version": names["base_model_version"]}
    _write_file(output, kohya, meta)


def _export_lycoris(src: Final, adapter: dict, config: dict, output: Path, dtype: str | None) -> None:
    """A LoKr or LoHa adapter as one LyCORIS file (shared/lycoris.py), with kohya's metadata for LyCORIS."""
    from shared.lycoris import peft_to_lycoris
    kind, rank = LYCORIS_KINDS[config["peft_type"]], int(config["r"])
    alpha = float(config.get("alpha") or rank)
    try:
        tensors = peft_to_lycoris(adapter, kind, rank, alpha)
    except ValueError as e:
        raise ExportError(f"{src.folder}: {e}") from None
    tensors = {k: v if k.endswith(".alpha") else cast({k: v}, dtype)[k] for k, v in tensors.items()}
    names = src.family.modelspec_names
    meta = modelspec(src, output, lora=True) | {"ss_network_module": "lycoris.kohya", "ss_network_dim": str(rank),
                                                "ss_network_alpha": f"{alpha:g}",
                                                "ss_network_args": json.dumps({"algo": kind}),
                                                "ss_base_model_version": names["base_model_version"]}
    _write_file(output, tensors, meta)


def _export_full(src: Final, fmt: str, output: Path, dtype: str | None) -> None:
    from safetensors.torch import load_file
    state = load_file(str(src.folder / TRANSFORMER_FILE))
    if fmt == "diffusers":
        from safetensors.torch import save_file

        def write(tmp: Path) -> None:
            tmp.mkdir()
            shutil.copy(src.folder / "config.json", tmp / "config.json")
            save_file(cast(state, dtype), str(tmp / TRANSFORMER_FILE), metadata={"format": "pt"})
        _write_folder(output, src, write)
        return
    _write_file(output, cast(src.family.bfl().diffusers_to_bfl(state), dtype), modelspec(src, output, lora=False))


def _write_file(output: Path, tensors: dict, metadata: dict) -> None:
    from safetensors.torch import save_file
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    canonicalize_file(tmp)   # the metadata's keys in one order: the same bytes on every run
    if output.is_dir():   # --overwrite of a folder by a file
        shutil.rmtree(output)
    commit_file(tmp, output)


def _write_folder(output: Path, src: Final, write) -> None:
    """Build the folder under a temporary name (`write(tmp)`), add the training info, then swap it in."""
    def write_with_info(tmp: Path) -> None:
        write(tmp)
        shutil.copy(src.folder / TRAINING_INFO, tmp / TRAINING_INFO)
    replace_folder(output, write_with_info)


def replace_folder(output: Path, write) -> None:
    """`write(tmp)` builds the folder under a temporary name beside `output`, which then takes its place
    whole: no file of an older `output` is left in it, and an interrupted write leaves `output` as it was."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = output.with_name(f".{output.name}.tmp"), output.with_name(f".{output.name}.old")
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    write(tmp)
    if output.exists():
        output.rename(old)
    tmp.rename(output)
    if old.is_dir():
        shutil.rmtree(old)
    elif old.exists():
        old.unlink()
