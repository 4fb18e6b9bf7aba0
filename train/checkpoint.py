"""What a run leaves on disk: resumable checkpoints and the final transformer in diffusers' layout.

checkpoints/step-N/  accelerate's save_state (model or LoRA adapter, optimizer, scheduler, EMA, RNG)
                     + trainer_state.json (step) + rank{r}.json (data position) + rank{r}.safetensors
                     (the noise generator of each DataLoader worker). Written as step-N.tmp and renamed when complete.
final/               config.json + diffusion_pytorch_model.safetensors + flux_prep.json, or for LoRA
                     pytorch_lora_weights.safetensors + flux_prep.json; final/ema/ likewise for the EMA.
"""
from __future__ import annotations

import contextlib
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from shared.cache import atomic_write_json
from shared.models import TRAINING_INFO

STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dirs(output_dir) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))
             and (p / "trainer_state.json").is_file()]
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str | None, output_dir) -> Path | None:
    if not resume:
        return None
    if resume == "auto":
        found = checkpoint_dirs(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no trainer_state.json)")
    return path


def save_checkpoint(accelerator, output_dir, step: int, rank_state: dict, generators: list[torch.Generator],
                    keep: int) -> Path:
    root = Path(output_dir) / "checkpoints"
    final = root / f"step-{step}"
    tmp = root / f"step-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    rank = accelerator.process_index
    atomic_write_json(tmp / f"rank{rank}.json", rank_state)
    save_file({f"worker{w}": g.get_state() for w, g in enumerate(generators)}, str(tmp / f"rank{rank}.safetensors"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(tmp / "trainer_state.json", {"step": step, "world_size": accelerator.num_processes})
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in checkpoint_dirs(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path, generators: list[torch.Generator]) -> tuple[int, dict]:
    """Restore accelerate's state and this rank's generators; return (step, rank state)."""
    state = json.loads((path / "trainer_state.json").read_text())
    if state["world_size"] != accelerator.num_processes:
        raise ValueError(f"{path} was written by {state['world_size']} processes, this run has "
                         f"{accelerator.num_processes}; resume with the same number")
    accelerator.load_state(str(path))
    rank = accelerator.process_index
    rank_state = json.loads((path / f"rank{rank}.json").read_text())
    saved = load_file(str(path / f"rank{rank}.safetensors"))
    if "state" in saved:   # written before each worker had its own generator
        saved = {"worker0": saved.pop("state")}
    if len(saved) != len(generators):
        raise ValueError(f"{path} holds the noise generators of {len(saved)} DataLoader worker(s) per process, "
                         f"this run has {len(generators)}; set data.num_workers to match")
    for w, g in enumerate(generators):
        g.set_state(saved[f"worker{w}"])
    return int(state["step"]), rank_state


def register_lora_hooks(accelerator, lora_state_dict, load_lora_state_dict) -> None:
    """Make save_state/load_state write and read only the LoRA adapter of the model."""
    name = "lora_adapter.safetensors"

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            model = accelerator.unwrap_model(models[0])
            sd = {k: v.detach().contiguous().cpu() for k, v in lora_state_dict(model).items()}
            save_file(sd, str(Path(output_dir) / name))
        weights.clear()

    def load_hook(models, input_dir):
        model = accelerator.unwrap_model(models.pop())
        load_lora_state_dict(model, load_file(str(Path(input_dir) / name)))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


@contextlib.contextmanager
def swapped_weights(model, named: dict):
    """Temporarily load `named` (parameter name -> tensor) into the model, e.g. the EMA."""
    params = dict(model.named_parameters())
    saved = {n: params[n].detach().clone() for n in named}
    with torch.no_grad():
        for n, v in named.items():
            params[n].copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for n, v in saved.items():
                params[n].copy_(v)


def write_transformer(model, state_dict: dict, out: Path) -> None:
    """config.json + one safetensors file: what FluxTransformer2DModel.from_pretrained reads."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_config(str(out))
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    save_file(tensors, str(out / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})


def save_final(accelerator, model, output_dir, info: dict, lora: bool, ema=None) -> Path | None:
    """Write final/ (and final/ema/) atomically: built in final.tmp, then renamed."""
    out = Path(output_dir)
    tmp, final = out / "final.tmp", out / "final"
    unwrapped = accelerator.unwrap_model(model)
    state = None if lora else accelerator.get_state_dict(model)   # collective under FSDP
    if not accelerator.is_main_process:
        return None
    shutil.rmtree(tmp, ignore_errors=True)
    targets = [(tmp, None)] + ([(tmp / "ema", ema.named_weights())] if ema is not None else [])
    for folder, weights in targets:
        folder.mkdir(parents=True, exist_ok=True)
        with swapped_weights(unwrapped, weights) if (weights and lora) else contextlib.nullcontext():
            if lora:
                unwrapped.save_lora_adapter(str(folder))
            else:
                sd = state if weights is None else {**state, **weights}
                write_transformer(unwrapped, sd, folder)
        atomic_write_json(folder / TRAINING_INFO, {**info, "ema": weights is not None})
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final
