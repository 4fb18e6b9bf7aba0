"""Run the trainer and SIGKILL it at a chosen moment, as a crash or the OOM killer would, or Ctrl-C it:

    python tests/kill_trainer.py checkpoint|metrics|sigint|sigint-twice STEP TRAINER-ARGS...

`checkpoint STEP`: right after accelerate's save_state has written step STEP's weights and optimizer
into the checkpoint's temporary folder, before the checkpoint is complete. `metrics STEP`: in the
middle of appending step STEP's training record to metrics.jsonl (the first half of the line reaches
the file, then the kill). `sigint STEP`: SIGINT to the process group, as a terminal's Ctrl-C sends it
(DataLoader workers included; run this in a session of its own), during step STEP's first micro-batch;
`sigint-twice`: two of them. The trainer is the real one; only the moment of the signal is chosen here."""
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def kill_during_checkpoint(step: int) -> None:
    from accelerate import Accelerator
    save_state = Accelerator.save_state

    def saving(self, output_dir=None, **kwargs):
        out = save_state(self, output_dir, **kwargs)
        if Path(output_dir).name == f"step-{step}.tmp":
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    Accelerator.save_state = saving


def kill_during_metrics(step: int) -> None:
    from train.loop import Trainer
    log = Trainer.log

    def logging(self, record):
        if record.get("step") == step and "loss" in record:
            line = json.dumps(record) + "\n"
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(line[: len(line) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        return log(self, record)
    Trainer.log = logging


def interrupt_during_step(step: int, times: int = 1) -> None:
    from train.loop import Trainer
    forward = Trainer.forward_backward_step

    def stepping(self, batch, last):
        if self.step == step - 1 and not getattr(self, "interrupted_here", False):
            self.interrupted_here = True
            for _ in range(times):
                os.killpg(os.getpgrp(), signal.SIGINT)
        return forward(self, batch, last)
    Trainer.forward_backward_step = stepping


if __name__ == "__main__":
    kind, at = sys.argv[1], int(sys.argv[2])
    {"checkpoint": kill_during_checkpoint, "metrics": kill_during_metrics, "sigint": interrupt_during_step,
     "sigint-twice": lambda s: interrupt_during_step(s, times=2)}[kind](at)
    from train.cli import main
    main(sys.argv[3:])
