"""FSDP smoke test of the trainer on one GPU: prepare, sharded checkpoint, resume, final save, on the
tiny model, launched with the shipped configs/accelerate/fsdp.yaml (accelerate gives no FSDP to CPU
processes; the CPU tests reach the same code through tests/fsdp_cpu_train.py).

    python bench/fsdp_smoke.py [SHARDED_STATE_DICT|FULL_STATE_DICT] [bf16|fp8] [--lora RANK] [--ema DECAY]

Runs `accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 1 ... train` for 4
steps (a checkpoint every 2), then again to 6 steps with `--resume auto`, prints the losses and the
files written, and loads final/ (with diffusers' FluxTransformer2DModel.from_pretrained, or for LoRA
with load_lora_adapter). Exit status 1 if a step fails, 2 without a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FSDP_CONFIG = REPO / "configs/accelerate/fsdp.yaml"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("state_dict_type", nargs="?", default="SHARDED_STATE_DICT",
                   choices=["SHARDED_STATE_DICT", "FULL_STATE_DICT"])
    p.add_argument("precision", nargs="?", default="bf16", choices=["bf16", "fp8"])
    p.add_argument("--lora", type=int, default=0, help="LoRA rank (0: full training)")
    p.add_argument("--ema", type=float, default=0.0, help="EMA decay (0: none)")
    return p.parse_args(argv)


def write_config(root: Path, cache: Path, steps: int, resume: str | None, args) -> Path:
    import yaml
    cfg = {"data": {"train_cache": str(cache), "batch_size": 4, "num_workers": 1, "shuffle_buffer": 4},
           "model": {"name": "tiny", "init": "random"},
           "run": {"output_dir": str(root / "run"), "precision": args.precision, "log_every": 1,
                   "tensorboard": False, "progress": False, "max_steps": steps, "checkpoint_every": 2,
                   "resume": resume},
           "flow": {"guidance_dropout": 0.2}, "lora": {"rank": args.lora, "allow_random_base": True},
           "ema": {"decay": args.ema}}
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def launch_command(config: Path, args) -> list[str]:
    return ["accelerate", "launch", "--config_file", str(FSDP_CONFIG), "--num_processes", "1",
            "--fsdp_state_dict_type", args.state_dict_type, "train", "--config", str(config)]


def load_final(final: Path, lora: bool) -> str:
    from diffusers import FluxTransformer2DModel
    if not lora:
        model = FluxTransformer2DModel.from_pretrained(final)
        return f"final/ loads: {sum(p.numel() for p in model.parameters())} parameters"
    from shared.presets import transformer_config
    model = FluxTransformer2DModel(**transformer_config("tiny"))
    model.load_lora_adapter(str(final), prefix=None, use_safetensors=True)
    return f"final/ adapter loads: {sum(p.numel() for n, p in model.named_parameters() if 'lora' in n)} parameters"


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("bench/fsdp_smoke.py needs a CUDA GPU: accelerate runs CPU processes without FSDP")
        return 2
    from train_caches import write_cache
    root = Path(tempfile.gettempdir()) / "flux-fsdp-smoke"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    cache = write_cache(root / "cache", 32, rows_per_shard=8, row_group_rows=2)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    for steps, resume in ((4, None), (6, "auto")):
        command = launch_command(write_config(root, cache, steps, resume, args), args)
        proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        said = [ln for ln in proc.stdout.splitlines() if "resumed" in ln or "wrote" in ln]
        print(f"run to step {steps} (resume={resume}): exit {proc.returncode} {said}")
        if proc.returncode:
            print(proc.stderr[-3000:])
            return 1
    for line in (root / "run/metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        print({k: record[k] for k in ("step", "loss") if k in record})
    print(sorted(str(p.relative_to(root / "run")) for p in (root / "run").rglob("*") if p.is_file()))
    print(load_final(root / "run/final", args.lora > 0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
