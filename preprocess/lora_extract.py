"""`flux-prep lora extract`: a LoRA adapter of rank R from a full-weight fine-tune and its base.

Each linear layer the family's LoRA targets by default (Family.default_lora_targets, what a LoRA run
trains) gets the truncated SVD of its weight's change, dW = U S Vh: lora_B = U_R sqrt(S_R), lora_A =
sqrt(S_R) Vh_R, alpha = R (scale 1), so B A is dW's best rank-R approximation (Eckart-Young) and its
relative error ||dW - BA|| / ||dW|| is sqrt(sum of the dropped S^2 / sum of all S^2). A changed bias of
those layers goes in lora_B's bias (peft's lora_bias). A layer narrower than R keeps all its directions
(the rest of its rank is zeros). Changes outside those layers (norms, embedders, other linears) are not
captured; they are counted and named. The adapter is written as the family's diffusers pipeline writes
one (save_lora_weights: what the trainer's final/ holds and `flux-sample --lora` loads).

BASE and TUNED: model folders (their transformer/), transformer folders (a full run's final/), or one
.safetensors file each in Black Forest Labs' layout.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from shared.family import Family, family_of_transformer
from shared.run_files import TRAINING_INFO, read_training_info

from .export import ExportError, replace_folder
from .lora_merge import bfl_family, transformer_folder


@dataclass
class Weights:
    family: Family
    config: dict
    state: dict          # diffusers' keys
    info: dict           # flux_prep.json beside it (a trainer's final/), else {}


def read_weights(path: Path) -> Weights:
    """A transformer's weights in diffusers' keys, as stored (no model built)."""
    from safetensors.torch import load_file

    from shared.bfl import read_shapes
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ExportError(f"{path}: a single-file transformer is a .safetensors file in BFL's layout")
        family = bfl_family(read_shapes(path))
        bfl = family.bfl()
        config = bfl.config_from_shapes(read_shapes(path))
        with torch.device("meta"):
            target = {k: tuple(v.shape) for k, v in family.transformer_cls().from_config(config).state_dict().items()}
        try:
            return Weights(family, config, bfl.bfl_to_diffusers(load_file(str(path)), target), {})
        except ValueError as e:
            raise ExportError(f"{path}: {e}") from None
    if not path.is_dir():
        raise ExportError(f"{path}: no such model folder or file")
    folder = transformer_folder(path)
    config = json.loads((folder / "config.json").read_text())
    family = family_of_transformer(config)
    if family is None:
        raise ExportError(f"{folder}: its config names no FLUX transformer class flux-prep knows")
    state = {}
    for file in sorted(folder.glob("*.safetensors")):   # one file, or diffusers' shards
        state.update(load_file(str(file)))
    if not state:
        raise ExportError(f"{folder}: no .safetensors weights")
    return Weights(family, config, state, read_training_info(folder))


def target_layers(family: Family, config: dict, targets: str) -> list[str]:
    """The linear layers `targets` (a regex, peft's full match) names in a transformer of `config`."""
    with torch.device("meta"):
        model = family.transformer_cls().from_config(config)
    return [name for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and re.fullmatch(targets, name)]


def low_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """(B [out, R], A [R, in], ||dW - BA||^2, ||dW||^2) of dW's truncated SVD."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    keep = min(rank, s.numel())
    root = s[:keep].sqrt()
    b = delta.new_zeros(delta.shape[0], rank)
    a = delta.new_zeros(rank, delta.shape[1])
    b[:, :keep] = u[:, :keep] * root
    a[:keep] = root[:, None] * vh[:keep]
    return b, a, float((s[keep:] ** 2).sum()), float((s ** 2).sum())


def check_pair(base: Weights, tuned: Weights, base_path: Path, tuned_path: Path) -> None:
    if base.family is not tuned.family:
        raise ExportError(f"{tuned_path} is a {tuned.family.name} transformer, {base_path} a {base.family.name} one")
    shapes = {k: tuple(v.shape) for k, v in base.state.items()}
    theirs = {k: tuple(v.shape) for k, v in tuned.state.items()}
    if shapes != theirs:
        diff = sorted(set(shapes.items()) ^ set(theirs.items()))[0][0]
        raise ExportError(f"{tuned_path} and {base_path} are transformers of other sizes (first difference: {diff})")


@dataclass
class Extracted:
    adapter: dict        # peft's names: {layer}.lora_A.weight, .lora_B.weight (.lora_B.bias)
    errors: dict         # layer -> relative error
    overall: float
    uncaptured: list     # other tensors that changed


def extract_adapter(base: Weights, tuned: Weights, rank: int, device: str = "cpu") -> Extracted:
    layers = target_layers(base.family, base.config, base.family.default_lora_targets)
    adapter, errors, lost, total = {}, {}, 0.0, 0.0
    bias = any(not torch.equal(base.state[f"{n}.bias"], tuned.state[f"{n}.bias"])
               for n in layers if f"{n}.bias" in base.state)
    for name in layers:
        delta = tuned.state[f"{name}.weight"].to(device, torch.float32) - base.state[f"{name}.weight"].to(device,
                                                                                                          torch.float32)
        b, a, rest, whole = low_rank(delta, rank)
        adapter[f"{name}.lora_A.weight"], adapter[f"{name}.lora_B.weight"] = a.cpu(), b.cpu()
        if bias:
            key = f"{name}.bias"
            adapter[f"{name}.lora_B.bias"] = ((tuned.state[key].float() - base.state[key].float()) if key in base.state
                                              else torch.zeros(b.shape[0]))
        errors[name] = (rest / whole) ** 0.5 if whole else 0.0
        lost, total = lost + rest, total + whole
    covered = {f"{n}.weight" for n in layers} | {f"{n}.bias" for n in layers}
    uncaptured = [k for k in base.state if k not in covered and not torch.equal(base.state[k], tuned.state[k])]
    return Extracted(adapter, errors, (lost / total) ** 0.5 if total else 0.0, uncaptured)


def extract(base_path: Path, tuned_path: Path, rank: int, out: Path, overwrite: bool = False,
            device: str = "cpu") -> list[str]:
    """Write the rank-`rank` adapter of TUNED - BASE to `out`; returns the report's lines."""
    if rank < 1:
        raise ExportError(f"--rank must be at least 1, got {rank}")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise ExportError(f"{out}: exists; pass --overwrite to replace it")
    base, tuned = read_weights(base_path), read_weights(tuned_path)
    check_pair(base, tuned, base_path, tuned_path)
    result = extract_adapter(base, tuned, rank, device)
    _write_adapter(out, base.family, result.adapter, rank, tuned.info)
    worst = max(result.errors, key=result.errors.get)
    lines = [f"wrote {out}: rank {rank} LoRA of {len(result.errors)} layers ({base.family.name})",
             f"relative error ||dW - BA|| / ||dW||: {result.overall:.4g} overall, worst {result.errors[worst]:.4g} "
             f"({worst})"]
    if result.uncaptured:
        lines.append(f"not captured (outside the LoRA's layers): {len(result.uncaptured)} changed tensors, e.g. "
                     + ", ".join(result.uncaptured[:3]))
    return lines


def _write_adapter(out: Path, family: Family, adapter: dict, rank: int, info: dict) -> None:
    import diffusers
    from peft import LoraConfig
    bias = any(k.endswith(".lora_B.bias") for k in adapter)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=family.default_lora_targets, lora_bias=bias).to_dict()
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    pipeline = getattr(diffusers, family.lora_pipeline)

    def write(tmp: Path) -> None:
        tmp.mkdir()
        pipeline.save_lora_weights(str(tmp), transformer_lora_layers={k: v.contiguous() for k, v in adapter.items()},
                                   transformer_lora_adapter_metadata=config)
        if info:   # the fine-tune's conventions (text mode and length, steps), as its final/ recorded them
            extracted = {**info, "lora": {"rank": rank, "alpha": rank, "extracted": True}}
            (tmp / TRAINING_INFO).write_text(json.dumps(extracted, indent=2, sort_keys=True))
    replace_folder(out, write)
