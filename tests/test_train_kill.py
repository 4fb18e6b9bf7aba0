"""kill -9 of the trainer process while it writes a checkpoint and while it appends metrics; the
resumed run's loss curve and weights equal the uninterrupted run's."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file
from train_caches import read_metrics, tiny_config, write_cache

from train.loop import train

REPO = Path(__file__).resolve().parent.parent
SETTINGS = {"run.max_steps": 7, "run.checkpoint_every": 3, "data.batch_size": 3, "data.num_workers": 1,
            "flow.guidance_dropout": 0.3, "ema.decay": 0.9, "schedule.kind": "cosine", "schedule.warmup_steps": 2,
            "run.deterministic": True}


def killed_trainer(cfg, kill, *extra):
    """The trainer as a process of its own, killed by tests/kill_trainer.py at `kill` (one thread, as here)."""
    config = Path(cfg.run.output_dir).parent / "cfg.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump(json.loads(json.dumps(cfg.to_dict()))))
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "tests/kill_trainer.py", *kill, "--config", str(config), *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


def test_kill_9_while_appending_metrics_and_while_checkpointing_then_resume(tmp_path):
    cache = write_cache(tmp_path / "c", 24, sizes=((8, 8), (8, 12)), rows_per_shard=8, row_group_rows=4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as the killed processes run: the same float results
    try:
        train(tiny_config(tmp_path / "full", cache, **SETTINGS))
        cut = tiny_config(tmp_path / "cut", cache, **SETTINGS)
        run = Path(cut.run.output_dir)
        killed_trainer(cut, ("metrics", "5"))             # after checkpoint 3
        assert not (run / "metrics.jsonl").read_text().endswith("\n")    # half a line
        killed_trainer(cut, ("checkpoint", "6"), "--run.resume", "auto")
        assert (run / "checkpoints/step-6.tmp").is_dir() and not (run / "checkpoints/step-6").exists()
        train(tiny_config(tmp_path / "cut", cache, **SETTINGS, **{"run.resume": "auto"}))
    finally:
        torch.set_num_threads(threads)

    def losses(run_dir):
        return [(m["step"], m["loss"]) for m in read_metrics(run_dir) if "loss" in m]
    full = tmp_path / "full/run"
    assert losses(run) == losses(full) and len(losses(full)) == 7
    for weights in ("diffusion_pytorch_model.safetensors", "ema/diffusion_pytorch_model.safetensors"):
        a, b = load_file(full / "final" / weights), load_file(run / "final" / weights)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
