"""Ctrl-C in the trainer: the step under way finishes, a checkpoint of it is saved, the way to resume
is printed and the exit status is 130; the resumed run ends with the uninterrupted run's losses and
weights. Twice: it stops at once, naming the latest checkpoint. The signal goes to the whole process
group, as a terminal sends it, so the DataLoader worker receives it too."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from train_caches import read_metrics, tiny_config, write_cache

from train.loop import train

REPO = Path(__file__).resolve().parent.parent
SETTINGS = {"run.max_steps": 7, "run.checkpoint_every": 3, "run.grad_accum": 2, "data.batch_size": 3,
            "data.num_workers": 1, "flow.guidance_dropout": 0.3, "ema.decay": 0.9, "schedule.kind": "cosine",
            "schedule.warmup_steps": 2, "run.deterministic": True}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_cache(tmp_path_factory.mktemp("cache") / "c", 24, sizes=((8, 8), (8, 12)), rows_per_shard=8,
                       row_group_rows=4)


def interrupted_trainer(cfg, kind: str, step: int) -> tuple[subprocess.CompletedProcess, Path]:
    """The trainer as a process of its own, in a session of its own (its process group is what the
    signal reaches), Ctrl-C'd by tests/kill_trainer.py during `step`; one thread, as the test's runs."""
    config = Path(cfg.run.output_dir).parent / "cfg.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump(json.loads(json.dumps(cfg.to_dict()))))
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "tests/kill_trainer.py", kind, str(step), "--config", str(config)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300, start_new_session=True)
    return proc, config


def losses(run_dir) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in read_metrics(run_dir) if "loss" in m]


def test_ctrl_c_saves_the_step_says_how_to_resume_and_the_resumed_run_ends_as_the_whole(tmp_path, cache):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as the interrupted process runs: the same float results
    try:
        train(tiny_config(tmp_path / "full", cache, **SETTINGS))
        cut = tiny_config(tmp_path / "cut", cache, **SETTINGS)
        run = Path(cut.run.output_dir)
        proc, config = interrupted_trainer(cut, "sigint", 5)
        assert proc.returncode == 130, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr and "KeyboardInterrupt" not in proc.stderr, proc.stderr[-3000:]
        # said once: the DataLoader worker ignores the signal (it would inherit the trainer's handler)
        assert proc.stderr.count("interrupted: stopping at the end of this step to save a checkpoint") == 1
        assert f"interrupted at step 5 of 7: saved {run}/checkpoints/step-5" in proc.stderr
        assert f"resume with: python -m train --config {config} --run.resume auto" in proc.stderr
        assert json.loads((run / "checkpoints/step-5/trainer_state.json").read_text())["step"] == 5
        assert not (run / "final").exists() and losses(run)[-1][0] == 5
        train(tiny_config(tmp_path / "cut", cache, **SETTINGS, **{"run.resume": "auto"}))
    finally:
        torch.set_num_threads(threads)
    full = tmp_path / "full/run"
    assert losses(run) == losses(full) and len(losses(full)) == 7
    for weights in ("diffusion_pytorch_model.safetensors", "ema/diffusion_pytorch_model.safetensors"):
        a, b = load_file(full / "final" / weights), load_file(run / "final" / weights)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_twice_stops_at_once_naming_the_latest_checkpoint(tmp_path, cache):
    cut = tiny_config(tmp_path, cache, **SETTINGS)
    run = Path(cut.run.output_dir)
    proc, config = interrupted_trainer(cut, "sigint-twice", 5)
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"interrupted: stopped at once, saving nothing; the latest checkpoint is {run}/checkpoints/step-3" \
        in proc.stderr
    assert f"resume with: python -m train --config {config} --run.resume auto" in proc.stderr
    assert not (run / "checkpoints/step-5").exists()
