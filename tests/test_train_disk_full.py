"""A full disk while the trainer writes a checkpoint: it says so in words, naming the checkpoint, removes
the partial step-N.tmp (which would keep the disk full), keeps the previous checkpoint, and exits 1; once
there is space, --run.resume auto finishes the run. On a real small filesystem (a size-limited tmpfs,
where the test may mount one) and with the save call stubbed to fail as a full disk does."""
import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from train_caches import read_metrics, tiny_config, write_cache

from train.checkpoint import CheckpointWriteError
from train.cli import main
from train.loop import train

SETTINGS = {"run.max_steps": 4, "run.checkpoint_every": 2, "data.batch_size": 2}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_cache(tmp_path_factory.mktemp("cache") / "c", 8)


def du(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def losses(run_dir) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in read_metrics(run_dir) if "loss" in m]


def no_space_message(run: Path, step: int, kept: int) -> str:
    return (f"no space left on device while writing checkpoints/step-{step} in {run} (the partial step-{step}.tmp "
            f"removed); the latest complete checkpoint, kept, is {run}/checkpoints/step-{kept}: free some space, "
            "then resume with --run.resume auto")


def test_no_space_at_the_save_call_is_said_cleaned_up_and_resumable(tmp_path, cache, monkeypatch, capsys):
    from accelerate import Accelerator
    save_state = Accelerator.save_state

    def disk_fills(self, output_dir=None, **kwargs):   # step 4's files are written, then the disk is full
        save_state(self, output_dir, **kwargs)
        if Path(output_dir).name == "step-4.tmp":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(Accelerator, "save_state", disk_fills)
    cfg = tiny_config(tmp_path, cache, **SETTINGS)
    run = Path(cfg.run.output_dir)
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(json.loads(json.dumps(cfg.to_dict()))))
    with pytest.raises(SystemExit) as exit_:
        main(["--config", str(config)])
    assert exit_.value.code == 1
    assert f"error: {no_space_message(run, 4, kept=2)}" in capsys.readouterr().err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2"]   # step-4.tmp removed
    monkeypatch.setattr(Accelerator, "save_state", save_state)   # space again
    train(tiny_config(tmp_path, cache, **SETTINGS, **{"run.resume": "auto"}))
    assert [s for s, _ in losses(run)] == [1, 2, 3, 4] and (run / "final/flux_prep.json").is_file()


@pytest.fixture
def small_disk(tmp_path):
    """A 9 MiB tmpfs: one checkpoint of the tiny model (5.6 MiB) fits, a second beside it does not."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=9m", "tmpfs", str(folder)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a size-limited tmpfs here (needs root); the stubbed test covers the path")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_a_real_full_disk_while_checkpointing(tmp_path, cache, small_disk):
    settings = {**SETTINGS, "run.checkpoint_every": 1, "run.keep_checkpoints": 1, "run.max_steps": 2}
    train(tiny_config(tmp_path / "whole", cache, **settings))
    run = small_disk / "run"
    with pytest.raises(CheckpointWriteError) as error:
        train(tiny_config(small_disk, cache, **settings))
    assert str(error.value) == no_space_message(run, 2, kept=1)   # torch.save's own error names no cause
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-1"]
    assert (run / "checkpoints/step-1/trainer_state.json").is_file()
    # the partial's space is free again (no writer left holding its deleted file open)
    assert shutil.disk_usage(small_disk).free > 9 * 2**20 - du(run) - 2**20
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)   # space freed
    train(tiny_config(small_disk, cache, **settings, **{"run.resume": "auto"}))
    assert losses(run) == losses(tmp_path / "whole/run") and (run / "final/flux_prep.json").is_file()
