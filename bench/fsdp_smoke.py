"""FSDP smoke test of the trainer on one GPU: prepare, sharded checkpoint, resume, final save, on the
tiny model (accelerate gives no FSDP to CPU processes, so the CPU tests cannot cover this path).

    python bench/fsdp_smoke.py [SHARDED_STATE_DICT|FULL_STATE_DICT] [bf16|fp8]     # on a GPU

Runs `accelerate launch --use_fsdp --fsdp_version 2 ... train` for 4 steps (a checkpoint every 2),
then again to 6 steps with `--resume auto`, prints the losses and the files written, and loads
final/ with diffusers' FluxTransformer2DModel.from_pretrained. Exit status 1 if a step fails.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

FSDP_FLAGS = ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
              "--fsdp_transformer_layer_cls_to_wrap", "FluxTransformerBlock,FluxSingleTransformerBlock"]


def write_config(root: Path, cache: Path, steps: int, resume: str | None, precision: str) -> Path:
    import yaml
    cfg = {"data": {"train_cache": str(cache), "batch_size": 4, "num_workers": 1, "shuffle_buffer": 4},
           "model": {"name": "tiny"},
           "run": {"output_dir": str(root / "run"), "precision": precision, "log_every": 1, "tensorboard": False,
                   "progress": False, "max_steps": steps, "checkpoint_every": 2, "resume": resume},
           "flow": {"guidance_dropout": 0.2}}
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def main() -> int:
    import torch
    if not torch.cuda.is_available():
        print("bench/fsdp_smoke.py needs a CUDA GPU: accelerate runs CPU processes without FSDP")
        return 2
    from train_caches import write_cache
    state_dict_type = sys.argv[1] if len(sys.argv) > 1 else "SHARDED_STATE_DICT"
    precision = sys.argv[2] if len(sys.argv) > 2 else "bf16"
    root = Path(tempfile.gettempdir()) / "flux-fsdp-smoke"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    cache = write_cache(root / "cache", 32, rows_per_shard=8, row_group_rows=2)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    for steps, resume in ((4, None), (6, "auto")):
        proc = subprocess.run(["accelerate", "launch", "--num_processes", "1", "--num_machines", "1",
                               "--mixed_precision", "bf16", "--dynamo_backend", "no", *FSDP_FLAGS,
                               "--fsdp_state_dict_type", state_dict_type,
                               "train", "--config", str(write_config(root, cache, steps, resume, precision))],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        said = [ln for ln in proc.stdout.splitlines() if "resumed" in ln or "wrote" in ln]
        print(f"run to step {steps} (resume={resume}): exit {proc.returncode} {said}")
        if proc.returncode:
            print(proc.stderr[-3000:])
            return 1
    for line in (root / "run/metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        print({k: record[k] for k in ("step", "loss") if k in record})
    print(sorted(str(p.relative_to(root / "run")) for p in (root / "run").rglob("*") if p.is_file()))
    from diffusers import FluxTransformer2DModel
    model = FluxTransformer2DModel.from_pretrained(root / "run/final")
    print(f"final/ loads: {sum(p.numel() for p in model.parameters())} parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
