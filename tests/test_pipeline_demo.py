"""The whole embedded demo through `dvc repro`, as a user runs it on a fresh clone (issue 6).

One test, because the full run is the expensive part (minutes on 2 cores): it reproduces the pipeline
in a copy of the working tree, checks that the demo learned (validation loss falls, samples show the
prompted colour and background well above chance), then checks with `dvc status` alone (no second run)
that a train parameter invalidates train but not encode, and that the resolution invalidates encode.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# What the pipeline writes: never copied, so the checks below see this run's outputs.
GENERATED = ("dvc.lock", "metrics/", "docs/demo_samples.png")
REPRO_TIMEOUT_S = 1200


def _copy_working_tree(dest: Path) -> None:
    """Tracked files and untracked-but-not-ignored ones, as a fresh clone plus local edits would have."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if rel.startswith(GENERATED) or not src.is_file():   # also skips tracked files deleted locally
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)


def _env(tree: Path) -> dict:
    env = dict(os.environ)
    # The venv's dvc, flux-prep, flux-sample and python; the copy's code ahead of the editable install.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(tree)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               DVC_NO_ANALYTICS="1")
    # One intra-op thread per process: the tiny model gains nothing from more, and on a shared 2-core
    # machine two runs with 2 spinning OpenMP threads each slowed training ~70x (8 vs 590 images/s).
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _run(args: list[str], tree: Path, timeout: float) -> str:
    try:
        done = subprocess.run(args, cwd=tree, env=_env(tree), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"{' '.join(args)} ran past {timeout} s; output tail:\n{out[-6000:]}")
    if done.returncode != 0:
        pytest.fail(f"{' '.join(args)} exited {done.returncode}; output tail:\n{(done.stdout + done.stderr)[-6000:]}")
    return done.stdout


def _status(tree: Path) -> dict:
    """`dvc status --json`: {stage name: [changes]}; {} when everything is up to date."""
    return json.loads(_run(["dvc", "status", "--json"], tree, timeout=300) or "{}")


def _with_param(tree: Path, section: str, path: list[str], value) -> None:
    params = yaml.safe_load((tree / "params.yaml").read_text())
    node = params[section]
    for key in path[:-1]:
        node = node[key]
    assert node[path[-1]] != value
    node[path[-1]] = value
    (tree / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_dvc_repro_demo_learns_and_invalidates_by_stage(tmp_path):
    tree = tmp_path / "repo"
    tree.mkdir()
    _copy_working_tree(tree)
    # DVC needs a git repository; an empty one (no commit) is enough.
    subprocess.run(["git", "init", "-q"], cwd=tree, check=True)

    _run(["dvc", "repro"], tree, timeout=REPRO_TIMEOUT_S)

    # Training learned: validation loss at least halved.
    train = json.loads((tree / "metrics/train.json").read_text())
    assert train["val_loss"] < 0.5 * train["val_loss_start"], train
    assert (tree / "metrics/loss.csv").read_text().startswith("step,loss,val_loss")

    # The samples follow their prompts well above chance (colour 1/4, background 1/2).
    samples = json.loads((tree / "metrics/samples.json").read_text())
    assert samples["samples"] == 32, samples["samples"]
    assert samples["color_accuracy"] >= 0.75, samples["color_accuracy"]
    assert samples["background_accuracy"] >= 0.9, samples["background_accuracy"]
    with Image.open(tree / "docs/demo_samples.png") as grid:
        assert grid.width > 0 and grid.height > 0

    # 16 demo prompts x 2 seeds, each PNG carrying its prompt; grid.png is the only other image.
    demo_prompts = [p for p in (tree / "sample/prompts/demo.txt").read_text().splitlines() if p.strip()]
    prompts = []
    for png in sorted((tree / "data/samples").glob("*.png")):
        with Image.open(png) as img:
            if "prompt" in img.text:
                prompts.append(img.text["prompt"])
    assert len(prompts) == 32
    assert sorted(prompts) == sorted(demo_prompts * 2)

    assert _status(tree) == {}

    # A train parameter invalidates train, not the caches (nothing is rerun: status only).
    original = (tree / "params.yaml").read_text()
    _with_param(tree, "train", ["optim", "lr"], 5.0e-4)
    changed = _status(tree)
    assert "train" in changed, changed
    assert not {"encode@train", "encode@val"} & set(changed), changed

    # The resolution invalidates both caches.
    (tree / "params.yaml").write_text(original)
    assert _status(tree) == {}
    _with_param(tree, "encode", ["resolution"], 32)
    changed = _status(tree)
    assert {"encode@train", "encode@val"} <= set(changed), changed
