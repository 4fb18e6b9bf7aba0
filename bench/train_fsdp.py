"""The trainer under FSDP2 beside the same run without it: images/s and peak GPU memory, each row launched
with `accelerate launch` as a user would (configs/accelerate/fsdp.yaml for FSDP2).

    python bench/train_fsdp.py                                  # one GPU: reduced FLUX (2.55B: 4+8 blocks), 256px
    python bench/train_fsdp.py --full --num-processes 8         # the 12B FLUX.1-dev transformer on 8 GPUs, 512px
    python bench/train_fsdp.py --device cpu --tiny              # CPU smoke test: tiny model, 2 processes (gloo)

Rows: `plain` = `accelerate launch --num_processes N train` (one process, or DDP for N > 1) and `fsdp2` =
`accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes N train`, the same
settings and synthetic cache (bench/train_data.py, T5 padded) otherwise. `--full` runs the fsdp2 row
only: the 12B model with AdamW (16 bytes per weight, 192 GB) fits no single GPU, so DDP cannot run it.
Each process builds the random init on the host in fp32 (48 GB per process for the 12B: 8 processes
need ~400 GB of host memory, and some minutes). images/s is the global rate after the first logging
window; peak memory is torch.cuda.max_memory_allocated of the busiest rank over the run. Each row
prints the command it ran. On a CPU (--device cpu) FSDP2 needs tests/fsdp_cpu_train.py's switch
(accelerate gives CPU processes no FSDP) and 2 processes.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FSDP_CONFIG = REPO / "configs/accelerate/fsdp.yaml"
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="the tiny model at 64px (CPU smoke test)")
    p.add_argument("--full", action="store_true", help="the 12B FLUX.1-dev transformer at 512px (fsdp2 row)")
    p.add_argument("--num-processes", type=int, default=None, help="GPUs (default 1; 2 on a CPU)")
    p.add_argument("--rows", default=None, help="comma list: plain, fsdp2 (default both; --full: fsdp2)")
    p.add_argument("--batch-size", type=int, default=None, help="per process")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (one logging window)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--grad-checkpointing", action="store_true", help="(always on with --full)")
    p.add_argument("--lora", type=int, default=0, help="LoRA rank (0: full training)")
    p.add_argument("--ema", type=float, default=0.0, help="EMA decay (0: none)")
    p.add_argument("--precision", default=None, choices=["bf16", "no"], help="default bf16 on GPUs, no on CPUs")
    p.add_argument("--cache-root", default=os.path.join(tempfile.gettempdir(), "flux-bench-caches"))
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)   # a settings file: run one row's trainer
    args = p.parse_args(argv)
    cpu = args.device == "cpu"
    args.num_processes = args.num_processes or (2 if cpu else 1)
    args.rows = (args.rows or ("fsdp2" if args.full else "plain,fsdp2")).split(",")
    args.batch_size = args.batch_size or (2 if args.tiny else 4 if args.full else 16)
    args.steps = args.steps or (4 if args.tiny else 10 if args.full else 20)
    args.warmup = args.warmup or (2 if args.tiny else 5)
    args.precision = args.precision or ("no" if cpu and not args.lora else "bf16")   # LoRA's base is bf16
    args.grad_checkpointing = args.grad_checkpointing or args.full
    unknown = set(args.rows) - {"plain", "fsdp2"}
    if unknown:
        p.error(f"unknown row(s): {', '.join(sorted(unknown))}")
    if cpu and "fsdp2" in args.rows and args.num_processes < 2:
        p.error("FSDP2 on a CPU needs --num-processes 2 or more (one CPU process gets no FSDP from accelerate)")
    return args


def model_settings(args) -> dict:
    """The model and its synthetic cache's shapes: (trainer settings, latent size, T5 length)."""
    if args.tiny:
        return {"model.name": "tiny"}, 8, 32
    if args.full:
        return {"model.name": "flux-dev"}, 64, 512
    return {"model.name": "flux-schnell", "model.overrides": {"num_layers": 4, "num_single_layers": 8}}, 32, 256


def trainer_settings(args, cache: Path, out: Path) -> dict:
    """The trainer's config for a row, as {'section.key': value}."""
    model, _, _ = model_settings(args)
    window = args.warmup
    return {**model, "model.init": "random",
            "data.train_cache": str(cache), "data.batch_size": args.batch_size, "data.num_workers": 1,
            "data.shuffle_buffer": 4 * args.batch_size, "run.output_dir": str(out),
            "run.max_steps": window + window * -(-args.steps // window), "run.log_every": window,
            "run.precision": args.precision, "run.grad_checkpointing": args.grad_checkpointing,
            "run.grad_accum": args.grad_accum, "run.tensorboard": False, "run.progress": False,
            "run.save_final": False, "flow.guidance_dropout": 0.1, "optim.lr": 1e-5,
            "lora.rank": args.lora, "lora.allow_random_base": True, "ema.decay": args.ema}


def launch_command(row: str, args, settings_file: Path, port: int) -> list[str]:
    """`accelerate launch` of this script's worker for a row, as a user would launch `train`."""
    how = ["--config_file", str(FSDP_CONFIG)] if row == "fsdp2" else \
        (["--multi_gpu"] if args.num_processes > 1 else []) + ["--num_machines", "1", "--dynamo_backend", "no"]
    return ["accelerate", "launch", *how, "--num_processes", str(args.num_processes), "--mixed_precision",
            args.precision, "--main_process_port", str(port), str(Path(__file__).resolve()),
            "--worker", str(settings_file)]


def worker(settings_file: str) -> None:
    """One row, in each launched process: train, then rank 0 writes the rates and the busiest rank's peak."""
    import torch
    settings = json.loads(Path(settings_file).read_text())
    if settings.pop("cpu_fsdp") and os.environ.get("ACCELERATE_USE_FSDP") == "true":
        sys.path.insert(0, str(REPO / "tests"))
        from fsdp_cpu_train import use_fsdp_on_cpu
        use_fsdp_on_cpu()
    from train.config import load_config
    from train.loop import Trainer
    from train.records import read_records
    result_file = Path(settings.pop("result_file"))
    trainer = Trainer(load_config(None, settings))
    trainer.train(stop_after_step=trainer.max_steps)   # returns before end_training() ends the process group
    acc = trainer.accelerator
    peak = torch.cuda.max_memory_allocated() if trainer.device.type == "cuda" else 0
    peak = float(acc.gather(torch.tensor([float(peak)], device=trainer.device)).max())
    if acc.is_main_process:
        records = read_records(trainer.out)   # metrics.jsonl with timings.jsonl's images/s joined in
        timed = [r for r in records if "images_per_s" in r][1:]   # drop the warmup window
        result_file.write_text(json.dumps({
            "fsdp": acc.distributed_type.name == "FSDP", "processes": acc.num_processes,
            "images_per_s": sum(r["images_per_s"] for r in timed) / len(timed),
            "peak_mem_gib": peak / 2**30 if peak else None, "losses": [round(r["loss"], 4) for r in records
                                                                       if "loss" in r]}))
    acc.end_training()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_row(row: str, args, cache: Path, root: Path) -> dict:
    settings = {**trainer_settings(args, cache, root / f"run-{row}"), "result_file": str(root / f"{row}.json"),
                "cpu_fsdp": args.device == "cpu" and row == "fsdp2"}
    settings_file = root / f"{row}-settings.json"
    settings_file.write_text(json.dumps(settings))
    command = launch_command(row, args, settings_file, free_port())
    print("$ " + " ".join(command), flush=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", **({"ACCELERATE_USE_CPU": "1"} if args.device == "cpu" else {}))
    log = root / f"{row}.log"
    with open(log, "w") as out:
        proc = subprocess.run(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode:
        errors = [ln for ln in log.read_text().splitlines() if "Error" in ln and "ChildFailedError" not in ln]
        return {"row": row, "error": f"exit {proc.returncode}: {errors[-1] if errors else ''} (log: {log})"}
    result = {"row": row, **json.loads((root / f"{row}.json").read_text())}
    if result["fsdp"] != (row == "fsdp2"):   # e.g. CPU processes, which accelerate gives no FSDP
        return {"row": row, "error": f"ran {'with' if result['fsdp'] else 'without'} FSDP (log: {log})"}
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from train_data import write_cache   # beside this file
    from shared.presets import transformer_config
    model, latent_hw, t5_len = model_settings(args)
    config = transformer_config(model["model.name"], **model.get("model.overrides", {}))
    # Each process reads row groups of its own (bench/train_data.py writes 32 rows a group).
    samples = max(args.batch_size * args.num_processes * args.grad_accum * (args.warmup + args.steps + 1),
                  64 * args.num_processes)
    cache, _ = write_cache(Path(args.cache_root), f"fsdp-padded{t5_len}-{latent_hw}-{samples}", "padded", t5_len,
                           samples, latent_hw, {"t5": config["joint_attention_dim"],
                                                "clip": config["pooled_projection_dim"]})
    root = Path(tempfile.mkdtemp(prefix="flux-bench-fsdp-"))
    rows = []
    for row in args.rows:
        rows.append(run_row(row, args, cache, root))
        print(json.dumps(rows[-1]), flush=True)
    print_table(rows, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return 1 if any("error" in r for r in rows) else 0


def print_table(rows, args) -> None:
    print(f"\n{args.num_processes} process(es), batch {args.batch_size} per process, grad_accum {args.grad_accum}, "
          f"precision {args.precision}, lora {args.lora}, ema {args.ema}")
    print(f"{'row':<7} {'img/s':>8} {'peak GiB':>9}  losses")
    for r in rows:
        if "error" in r:
            print(f"{r['row']:<7} {r['error']}")
            continue
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
        print(f"{r['row']:<7} {r['images_per_s']:>8.2f} {mem:>9}  {r['losses']}")


if __name__ == "__main__":
    sys.exit(main())
