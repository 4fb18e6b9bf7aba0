"""What a launch runs by, outside the Trainer's loop: the accelerator, the options one launch or
another refuses, the run's length in optimizer steps, the LR schedule, the log window's sums, and
Ctrl-C (a request to stop at the end of the step)."""
from __future__ import annotations

import math
import os
import signal
import threading
import time
from pathlib import Path

import torch

from shared.models import ModelLoadError

from .config import TrainConfig
from .trackers import check_installed


def lr_factor(step: int, warmup: int, total: int, kind: str, min_ratio: float) -> float:
    """Multiplier of the base lr after `step` optimizer steps: linear warmup, then constant or cosine."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def total_steps(cfg: TrainConfig, num_rows: int, world_size: int) -> int:
    if cfg.run.max_steps is not None:
        return cfg.run.max_steps
    per_step = cfg.data.batch_size * cfg.run.grad_accum * world_size
    return max(1, math.ceil(cfg.run.epochs * num_rows / per_step))


def make_accelerator(run, out: Path):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    check_installed(run.log_with)
    return Accelerator(
        mixed_precision="bf16" if run.precision in ("bf16", "fp8") else "no",
        log_with=run.log_with or None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )


def check_launch(cfg: TrainConfig, num_processes: int, fsdp: bool) -> None:
    """Refuse, before the model is built, the options that one launch or another cannot run."""
    if fsdp and (cfg.model.quantize_base != "none" or cfg.run.offload_blocks or cfg.optim.in_backward):
        raise ModelLoadError("model.quantize_base, run.offload_blocks and optim.in_backward are for one GPU "
                             "without FSDP; FSDP shards the weights, gradients and optimizer state instead")
    if fsdp and cfg.lora.rank > 0 and cfg.run.precision == "fp8":
        raise ModelLoadError("run.precision fp8 with LoRA stores the frozen base in float8, which FSDP does not "
                             "shard: use run.precision bf16 under FSDP, or one GPU")
    if num_processes > 1 and cfg.optim.in_backward:
        raise ModelLoadError("optim.in_backward steps each parameter with its local gradient, before the "
                             f"{num_processes} processes have averaged it: use one process (or FSDP without it)")
    if num_processes > 1 and cfg.run.offload_blocks:
        raise ModelLoadError("run.offload_blocks is for one process; with several GPUs use FSDP")


class LogWindow:
    """What the steps since the last metrics record add up: their summed loss (on the device, read once
    per record: the one host sync), micro-batches, images, distinct samples per micro-batch (fewer than
    the images where a size's last batch of an epoch repeats its samples), time waited for data."""

    def __init__(self, device):
        self.loss_sum = torch.zeros((), device=device)
        self.reset()

    def reset(self) -> None:
        self.loss_sum.zero_()
        self.micro, self.images, self.distinct, self.wait = 0, 0, 0, 0.0
        self.start = time.perf_counter()


class StopRequest:
    """Ctrl-C (SIGINT) while the loop runs: the first asks it to stop at the end of the current step,
    where it saves a checkpoint; the second stops at once (KeyboardInterrupt), without one. A terminal
    sends it to every process of the group: DataLoader workers ignore it (train/data.py), so that the
    step under way can finish."""

    def __init__(self, announce: bool):
        self.asked = False
        self.announce = announce   # the main process says it, once
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():   # handlers belong to the main thread
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum, frame) -> None:
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True
        if self.announce:   # os.write: a handler may interrupt a print in progress
            os.write(2, b"\ninterrupted: stopping at the end of this step to save a checkpoint "
                        b"(Ctrl-C again stops at once, without one)\n")

    def requested(self, accelerator) -> bool:
        """Whether to stop now; with several processes, whether any was asked (all stop at the same step)."""
        if accelerator.num_processes == 1:
            return self.asked
        asked = torch.tensor([float(self.asked)], device=accelerator.device)
        return bool(accelerator.reduce(asked, reduction="sum").item() > 0)


class TrainingInterrupted(Exception):
    """The run stopped on Ctrl-C at `step`; `checkpoint` is the latest complete one (None: none), `saved`
    whether it was written on the way out."""

    def __init__(self, step: int, max_steps: int, checkpoint: Path | None, saved: bool):
        self.step, self.max_steps, self.checkpoint, self.saved = step, max_steps, checkpoint, saved
        where = f"saved {checkpoint}" if saved else f"the latest checkpoint is {checkpoint}" if checkpoint \
            else "no checkpoint was written (a rerun starts at step 0)"
        super().__init__(f"interrupted at step {step} of {max_steps}: {where}")
