"""Launching the trainer for the tests as N processes on the CPU over gloo with accelerate's launcher,
DDP or FSDP2 (configs/accelerate/fsdp.yaml, through tests/fsdp_cpu_train.py), with a timeout; and
killing such a run with SIGKILL mid-way. Each returns the run folder (run.output_dir).

"The same global batch" in this trainer: N processes with one DataLoader worker each read the data
slots that one process with N workers reads (data.py), and take one batch each per step where the one
process accumulates N batches (`same_global_batch`)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
FSDP_CONFIG = REPO / "configs/accelerate/fsdp.yaml"
FSDP_ENTRY = REPO / "tests/fsdp_cpu_train.py"


def env() -> dict:
    e = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
             ACCELERATE_USE_CPU="1")
    e.pop("PYTHONPATH", None)
    return e


def write_config(folder: Path, cache: Path, val_cache: Path | None = None, settings: dict | None = None,
                 **run) -> Path:
    """A config for the tiny model on the CPU in fp32: 2 samples per batch, 1 DataLoader worker; `run`
    are run.* keys, `settings` any others as {'section.key': value}."""
    cfg = {"data": {"train_cache": str(cache), "val_cache": str(val_cache) if val_cache else None,
                    "batch_size": 2, "num_workers": 1, "shuffle_buffer": 4},
           "model": {"name": "tiny"},
           "run": {"output_dir": str(folder / "run"), "precision": "no", "log_every": 1, "tensorboard": False,
                   "progress": False, "record_keys": True, **run},
           "flow": {"guidance_dropout": 0.2}}
    for key, value in (settings or {}).items():
        section, name = key.split(".", 1)
        cfg.setdefault(section, {})[name] = value
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def overrides(settings: dict) -> list[str]:
    """{'run.max_steps': 4} -> ['--run.max_steps', '4']"""
    return [a for k, v in settings.items() for a in (f"--{k}", v if isinstance(v, str) else json.dumps(v))]


def launch_command(config: Path, processes: int, fsdp: bool, settings: dict) -> list[str]:
    if fsdp:
        how = ["--config_file", str(FSDP_CONFIG), "--mixed_precision", "no", str(FSDP_ENTRY)]
    else:
        how = ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "train"]
    return ["accelerate", "launch", "--num_processes", str(processes), "--main_process_port", str(free_port()),
            *how, "--config", str(config), *overrides(settings)]


def output_dir(config: Path, settings: dict) -> Path:
    return Path(settings.get("run.output_dir") or yaml.safe_load(config.read_text())["run"]["output_dir"])


def launch(config: Path, processes: int = 2, fsdp: bool = True, timeout: float = 240, **settings) -> Path:
    """`accelerate launch` the trainer over `processes` CPU processes; settings are {'section.key': value}."""
    command = launch_command(config, processes, fsdp, settings)
    proc = subprocess.run(command, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(command)}\nexit {proc.returncode}\n{proc.stderr[-4000:]}"
    return output_dir(config, settings)


def same_global_batch(processes: int = 2, grad_accum: int = 1) -> dict:
    """Settings for one process that give it the global batch of `processes` processes with one
    DataLoader worker each and `grad_accum` accumulation steps: as many workers, and `processes` times
    as many accumulation steps."""
    return {"data.num_workers": processes, "run.grad_accum": processes * grad_accum}


def launch_and_kill(config: Path, when_exists: str, processes: int = 2, timeout: float = 240, **settings) -> Path:
    """Launch as `launch` does and SIGKILL the launcher and every process under it as soon as the file
    `when_exists` (relative to the run folder) appears, as a crash or a preempted machine would."""
    out = output_dir(config, settings)
    log = config.parent / "killed-run.log"   # a file, not a pipe: nobody reads a pipe while the run goes on
    with open(log, "w") as stderr:
        proc = subprocess.Popen(launch_command(config, processes, True, settings), cwd=REPO, env=env(),
                                stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.monotonic() + timeout
    try:
        while not (out / when_exists).exists():
            assert proc.poll() is None, f"the run ended before {when_exists} appeared:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"no {when_exists} after {timeout} s"
            time.sleep(0.05)
    finally:
        kill_tree(proc)
    return out


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher and every process under it (torchrun starts each worker in its own session,
    so the launcher's process group does not reach them)."""
    import psutil
    try:
        root = psutil.Process(proc.pid)
        victims = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        victims = []
    for p in victims:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)
