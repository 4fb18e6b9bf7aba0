"""What a run leaves on disk: resumable checkpoints and the final transformer in diffusers' layout.

checkpoints/step-N/  accelerate's save_state (model or LoRA adapter, optimizer, scheduler, EMA, RNG)
                     + flux_prep.json (the sampling conventions, as in final/: flux-sample reads a checkpoint)
                     + trainer_state.json (step) + rank{r}.json (data position) + rank{r}.safetensors
                     (the noise generator of each DataLoader worker). Written as step-N.tmp and renamed when complete.
                     Under FSDP: the sharded model (a LoRA run's frozen base included) and optimizer
                     (torch.distributed.checkpoint folders), and ema/, the EMA's shards.
final/               config.json + diffusion_pytorch_model.safetensors + flux_prep.json, or for LoRA
                     pytorch_lora_weights.safetensors (FluxPipeline.load_lora_weights reads it) + flux_prep.json;
                     final/ema/ likewise for the EMA.
                     Under FSDP gathered from the shards and written by the main process alone.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import traceback
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from shared.cache import atomic_write_json
from shared.run_files import (LORA_PREFIX, LORA_WEIGHTS, OLD_LORA_WEIGHTS, STEP_DIR, TRAINING_INFO, TRANSFORMER_WEIGHTS,
                              write_lora_weights)

from .fsdp import trainable_weights



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
                    keep: int, sharded: dict | None = None, info: dict | None = None) -> Path:
    """`sharded`: {folder name: state dict of DTensors} that every rank writes its shards of with
    torch.distributed.checkpoint (the EMA under FSDP: register_for_checkpointing would pickle the main
    process's shard alone). `info`: the sampling conventions, written as in final/ (its weights: not the EMA)."""
    root = Path(output_dir) / "checkpoints"
    final = root / f"step-{step}"
    tmp = root / f"step-{step}.tmp"
    with written_or_removed(tmp, f"checkpoints/{final.name}", output_dir, accelerator.is_main_process):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        if sharded:
            import torch.distributed.checkpoint as dcp
            for name, state in sharded.items():
                dcp.save(state, checkpoint_id=str(tmp / name))
        rank = accelerator.process_index
        atomic_write_json(tmp / f"rank{rank}.json", rank_state)
        save_file({f"worker{w}": g.get_state() for w, g in enumerate(generators)},
                  str(tmp / f"rank{rank}.safetensors"))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if info is not None:
                atomic_write_json(tmp / TRAINING_INFO, {**info, "ema": False})
            atomic_write_json(tmp / "trainer_state.json", {"step": step, "world_size": accelerator.num_processes})
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in checkpoint_dirs(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


class CheckpointWriteError(Exception):
    """A checkpoint (or final/) that could not be written for want of space; its partial folder is removed."""


@contextlib.contextmanager
def written_or_removed(tmp: Path, name: str, output_dir, main: bool):
    """Write `name` (as the user knows it: checkpoints/step-N, final) into its temporary folder `tmp`. On a
    failure the partial folder is removed (on a full disk it would keep the disk full), and a full disk is
    said in words, naming the latest complete checkpoint, which is kept; other errors pass through."""
    try:
        yield
    except BaseException as e:   # Ctrl-C twice too: a partial folder is of no use
        full = isinstance(e, Exception) and disk_full(e, tmp.parent)
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        if not full:
            raise
        _release_writers(e)
        found = checkpoint_dirs(output_dir)
        latest = f"the latest complete checkpoint, kept, is {found[-1]}" if found else "there is no complete checkpoint"
        raise CheckpointWriteError(f"no space left on device while writing {name} in {output_dir} (the partial "
                                   f"{tmp.name} removed); {latest}: free some space, then resume with "
                                   "--run.resume auto") from e


def _release_writers(e: BaseException) -> None:
    """A failed writer (torch.save's) holds its deleted file open from the frames of the error's tracebacks,
    keeping the space taken while the error is held: clear the frames' locals along the chain."""
    while e is not None:
        traceback.clear_frames(e.__traceback__)
        e = e.__cause__ or e.__context__


NO_SPACE_WORDS = ("No space left on device", "Disk quota exceeded", "StorageFull")
NEARLY_FULL = 64 << 20   # bytes: torch.save's error on a full disk ("unexpected pos") carries no errno


def disk_full(e: BaseException, folder: Path) -> bool:
    """Whether a write failed for want of space: ENOSPC or EDQUOT in the exception's chain, or the words of
    safetensors' error for it, or (torch.save says only "unexpected pos") hardly any space left in `folder`."""
    import errno
    cause = e
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(words in str(cause) for words in NO_SPACE_WORDS):
            return True
        cause = cause.__cause__ or cause.__context__
    try:
        return shutil.disk_usage(folder).free < NEARLY_FULL
    except OSError:
        return False


def load_checkpoint(accelerator, path: Path, generators: list[torch.Generator],
                    sharded: dict | None = None) -> tuple[int, dict]:
    """Restore accelerate's state, the `sharded` states (in place, as save_checkpoint) and this rank's
    generators; return (step, rank state)."""
    state = json.loads((path / "trainer_state.json").read_text())
    if state["world_size"] != accelerator.num_processes:
        raise ValueError(f"{path} was written by {state['world_size']} processes, this run has "
                         f"{accelerator.num_processes}; resume with the same number")
    missing = [name for name in sharded or {} if not (path / name / ".metadata").is_file()]
    if missing:
        raise ValueError(f"{path} has no {', '.join(missing)}/ (written by a run without it); resume with "
                         "the settings it was written with")
    accelerator.load_state(str(path))
    if sharded:
        import torch.distributed.checkpoint as dcp
        for name, sharded_state in sharded.items():
            dcp.load(sharded_state, checkpoint_id=str(path / name))
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




def register_lora_hooks(accelerator, load_lora_state_dict) -> None:
    """Make save_state/load_state write and read only the LoRA adapter of the model, in final/'s file format
    (so that flux-sample can load a checkpoint's adapter); older checkpoints' bare peft file still loads."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            model = accelerator.unwrap_model(models[0])
            trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
            write_lora_adapter(model, trainable, Path(output_dir))
        weights.clear()

    def load_hook(models, input_dir):
        model = accelerator.unwrap_model(models.pop())
        load_lora_state_dict(model, read_lora_adapter(Path(input_dir)))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def read_lora_adapter(folder: Path) -> dict:
    """peft's state dict (no prefix, no adapter name) of an adapter written by write_lora_adapter, or of an
    older checkpoint's bare file."""
    if not (folder / LORA_WEIGHTS).is_file():
        return load_file(str(folder / OLD_LORA_WEIGHTS))
    state = load_file(str(folder / LORA_WEIGHTS))
    return {k.removeprefix(f"{LORA_PREFIX}."): v for k, v in state.items()}


def write_transformer(model, state_dict: dict, out: Path) -> None:
    """config.json + one safetensors file: what the transformer class's from_pretrained reads."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_config(str(out))
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    save_file(tensors, str(out / TRANSFORMER_WEIGHTS), metadata={"format": "pt"})




def write_lora_adapter(model, weights: dict, folder: Path, adapter_name: str = "default") -> None:
    """The one file format of the trainer's LoRA adapters (final/, final/ema/, checkpoints), whether the
    weights come from one process or are gathered from FSDP shards: what the family's diffusers pipeline
    (FluxPipeline, Flux2KleinPipeline) writes with save_lora_weights (its training scripts' output), peft's key
    names under the "transformer." prefix in pytorch_lora_weights.safetensors, the adapter's peft config in its
    metadata; the pipeline's load_lora_weights and `flux-sample --lora` read it. `weights`: {parameter name:
    whole tensor} of the adapter's parameters (the model's own would be shards under FSDP)."""
    from peft.utils import get_peft_model_state_dict

    from shared.family import family_of_transformer
    family = family_of_transformer({"_class_name": type(model).__name__})
    adapter = get_peft_model_state_dict(model, state_dict=weights, adapter_name=adapter_name)
    folder.mkdir(parents=True, exist_ok=True)
    write_lora_weights(family, folder, adapter, model.peft_config[adapter_name].to_dict())


def save_final(accelerator, model, output_dir, info: dict, lora: bool, ema=None) -> Path | None:
    """Write final/ (and final/ema/) atomically: built in final.tmp, then renamed. Under FSDP every rank
    takes part in gathering the weights, then the main process alone writes them."""
    out = Path(output_dir)
    tmp, final = out / "final.tmp", out / "final"
    unwrapped = accelerator.unwrap_model(model)
    state = trainable_weights(accelerator, model) if lora else accelerator.get_state_dict(model)
    ema_state = ema.gathered(keep=accelerator.is_main_process) if ema is not None else None
    if not accelerator.is_main_process:
        return None
    shutil.rmtree(tmp, ignore_errors=True)
    targets = [(tmp, state)]
    if ema_state is not None:   # the EMA averages the trainable parameters; the rest are the model's
        targets.append((tmp / "ema", ema_state if lora else {**state, **ema_state}))
    with written_or_removed(tmp, "final", out, main=True):
        for folder, weights in targets:
            if lora:
                write_lora_adapter(unwrapped, weights, folder)
            else:
                write_transformer(unwrapped, weights, folder)
            atomic_write_json(folder / TRAINING_INFO, {**info, "ema": folder != tmp})
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final
