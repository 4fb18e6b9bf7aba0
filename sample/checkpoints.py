"""A trainer's intermediate checkpoints/step-N/ as flux-sample's transformer (full weights) or LoRA.

What the trainer leaves there (train/checkpoint.py): accelerate's model.safetensors (the whole
transformer in diffusers' keys) or, for LoRA, the adapter in the file format of final/
(pytorch_lora_weights.safetensors), and flux_prep.json, the sampling conventions. Its EMA, when the run
had one, is pickled by accelerate with the optimizer: flux-sample reads the trained weights and says so.
Under FSDP the weights are sharded (torch.distributed.checkpoint): only final/ is one readable file.
"""
from __future__ import annotations

import re
from pathlib import Path

from shared.bfl import read_shapes
from shared.run_files import FINAL, LORA_WEIGHTS, MODEL_WEIGHTS, OLD_LORA_WEIGHTS, read_training_info

STEP_DIR = re.compile(r"^step-(\d+)(\.tmp)?$")   # a complete checkpoint's folder, or one being written


class CheckpointError(Exception):
    """A checkpoint folder flux-sample cannot read; the message says why and what to use instead."""


def is_checkpoint(path: Path) -> bool:
    """A trainer's checkpoint folder, complete or not (a transformer folder of that name has its config.json)."""
    named = bool(STEP_DIR.match(path.name)) and not (path / "config.json").is_file()
    return named or (path / "trainer_state.json").is_file()


def _readable(path: Path) -> None:
    if path.name.endswith(".tmp") or not (path / "trainer_state.json").is_file():
        raise CheckpointError(f"{path}: an incomplete checkpoint (no trainer_state.json: still being written, "
                              "or its run stopped while writing it)")
    if any(p.name.startswith("pytorch_model_fsdp") for p in path.iterdir()):
        raise CheckpointError(f"{path}: a sharded checkpoint (FSDP, one shard per process); flux-sample reads "
                              "final/, or the checkpoints of a run without FSDP")


def full_weights(path: Path) -> Path:
    """The whole transformer's weights of a full-weight checkpoint."""
    _readable(path)
    if (path / MODEL_WEIGHTS).is_file():
        return path / MODEL_WEIGHTS
    if (path / LORA_WEIGHTS).is_file() or (path / OLD_LORA_WEIGHTS).is_file():
        raise CheckpointError(f"{path}: a LoRA checkpoint, not a transformer; pass it with --lora")
    raise CheckpointError(f"{path}: no {MODEL_WEIGHTS} (the transformer's weights) in this checkpoint")


def lora_weights(path: Path) -> Path:
    """The adapter file of a LoRA checkpoint."""
    _readable(path)
    if (path / LORA_WEIGHTS).is_file():
        return path / LORA_WEIGHTS
    if (path / OLD_LORA_WEIGHTS).is_file():
        raise CheckpointError(f"{path}: written before checkpoints held a loadable adapter ({OLD_LORA_WEIGHTS} has "
                              "no LoRA config); sample the run's final/, or a checkpoint of a newer run")
    if (path / MODEL_WEIGHTS).is_file():
        raise CheckpointError(f"{path}: a full-weight checkpoint, not a LoRA adapter; pass it with --transformer")
    raise CheckpointError(f"{path}: no {LORA_WEIGHTS} (the LoRA adapter) in this checkpoint")


def transformer_config(family, weights: Path, base: dict | None) -> dict:
    """The transformer's config (of `family`), every size read from the weights' shapes (rotary axes from `base`)."""
    try:
        return family.bfl().config_from_diffusers_shapes(read_shapes(weights), base)
    except ValueError as e:
        raise CheckpointError(f"{weights}: {e}") from None
    except Exception as e:  # noqa: BLE001 -- a corrupt header
        raise CheckpointError(f"{weights}: not a readable safetensors file ({str(e).splitlines()[0]})") from e


def training_info(path: Path) -> dict:
    """The sampling conventions: the checkpoint's own, else (older checkpoints) the run's final/'s."""
    return read_training_info(path) or read_training_info(path.parent.parent / FINAL)


def weights_note(path: Path, info: dict) -> str:
    if info.get("ema_decay"):
        return (f"{path.name}: sampling the trained weights; its EMA (decay {info['ema_decay']}) is in final/ema/ "
                "once the run ends")
    return ""
