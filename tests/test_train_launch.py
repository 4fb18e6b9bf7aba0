"""Launching as documented: `accelerate launch --multi_gpu --num_processes 2 train ...` on the CPU, and `python train`."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from train_caches import write_cache

REPO = Path(__file__).resolve().parent.parent


def env():
    e = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    e.pop("PYTHONPATH", None)
    return e


def write_config(tmp_path, cache, **run):
    cfg = {"data": {"train_cache": str(cache), "batch_size": 2, "num_workers": 1, "shuffle_buffer": 4},
           "model": {"name": "tiny"},
           "run": {"output_dir": str(tmp_path / "run"), "precision": "no", "log_every": 1, "tensorboard": False,
                   "progress": False, "record_keys": True, **run},
           "flow": {"guidance_dropout": 0.2}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def launch_two(config, *extra):
    # accelerate's `--cpu` launches several processes only through mpirun; its torchrun launcher
    # (--multi_gpu) with ACCELERATE_USE_CPU=1 gives the same gloo CPU processes.
    proc = subprocess.run(["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29731",
                           "train", "--config", str(config), *extra],
                          cwd=REPO, env=dict(env(), ACCELERATE_USE_CPU="1"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_two_processes_see_disjoint_data_end_identical_and_resume_exactly(tmp_path):
    cache = write_cache(tmp_path / "c", 16, rows_per_shard=8, row_group_rows=2)
    config = write_config(tmp_path, cache, max_steps=4, checkpoint_every=2)
    launch_two(config)
    ranks = [json.loads((tmp_path / f"run/seen/rank{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]["keys"]) == len(ranks[1]["keys"]) == 8
    assert not set(ranks[0]["keys"]) & set(ranks[1]["keys"])
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    assert (tmp_path / "run/final/diffusion_pytorch_model.safetensors").is_file()

    # A run killed after checkpoint 2 (its copy), resumed by two processes: the same batches from step 3
    # on, on each rank, and the same weights at the end.
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "run/checkpoints/step-2", cut / "checkpoints/step-2")
    launch_two(config, "--run.output_dir", str(cut), "--run.resume", "auto")
    for r in (0, 1):
        resumed = json.loads((cut / f"seen/rank{r}.json").read_text())
        assert resumed["keys"] == ranks[r]["keys"][4:] and resumed["weights_sha256"] == ranks[r]["weights_sha256"]

    # Another world size is refused, before anything is trained.
    from train.config import load_config
    from train.loop import train
    one = load_config(config, {"run.output_dir": str(cut), "run.resume": "auto", "run.record_keys": False})
    with pytest.raises(ValueError, match="written by 2 processes, this run has 1"):
        train(one)


def test_python_train_folder_runs_from_repo_root(tmp_path):
    cache = write_cache(tmp_path / "c", 8)
    config = write_config(tmp_path, cache, max_steps=1)
    proc = subprocess.run([sys.executable, "train", "--config", str(config), "--run.record_keys", "false"],
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run/final/flux_prep.json").is_file()
    bad = subprocess.run([sys.executable, "-m", "train", "--config", str(config), "--optim.lrr", "1"],
                         cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "optim.lrr" in bad.stderr
