"""What --help shows a newcomer: closed choices listed, flags without a value, plan's own options only;
and one exit-status convention across flux-prep, flux-sample and the trainer (README, "Exit status")."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from preprocess.cli import app as flux_prep
from sample.cli import app as flux_sample

REPO = Path(__file__).resolve().parents[1]


def help_of(app, *command) -> str:
    r = CliRunner().invoke(app, [*command, "--help"], terminal_width=200)
    assert r.exit_code == 0, r.output
    return " ".join(r.output.split())


@pytest.mark.parametrize("app, command", [(flux_prep, ["encode"]), (flux_prep, ["plan"]), (flux_prep, ["export"]),
                                          (flux_prep, ["tiny-model"]), (flux_prep, ["inspect"]), (flux_sample, [])])
def test_flags_show_no_value(app, command):
    shown = help_of(app, *command)
    assert "<bool>" not in shown and "BOOLEAN" not in shown, shown
    if command == ["encode"]:
        assert "--buckets / --no-buckets Aspect-ratio" in shown and "--compile / --no-compile torch" in shown


def test_closed_choices_are_listed():
    encode = help_of(flux_prep, "encode")
    dtypes = "<bf16|fp16|fp32|bfloat16|float16|float32>"
    for shown in ("--t5-mode <padded|trimmed>", f"--dtype {dtypes}", f"--compute-dtype {dtypes}",
                  "--t5-impl <fused|transformers>", "--device auto|cpu|cuda|cuda:N"):
        assert shown in encode, shown
    sample = help_of(flux_sample)
    for shown in ("--t5-mode <padded|trimmed>", "--dtype <auto|bf16|fp16|fp32|bfloat16|float16|float32>",
                  "--device auto|cpu|cuda|cuda:N"):
        assert shown in sample, shown
    assert "--vae <pooling|random>" in help_of(flux_prep, "tiny-model")
    refused = CliRunner().invoke(flux_sample, ["--model", "m", "--prompt", "x", "--output", "o", "--dtype", "int8"])
    assert refused.exit_code == 2 and "'int8' is not one of 'auto', 'bf16', 'fp16', 'fp32'" in refused.output


def test_plan_lists_only_what_changes_its_estimate_and_takes_encodes_command_line(tiny_model, tmp_path):
    from preprocess.demo import write_demo_shards
    shown = help_of(flux_prep, "plan")
    for option in ("--model", "--input", "--resolution", "--t5-mode", "--t5-max-length", "--dtype", "--json"):
        assert option in shown, option
    for option in ("--compile", "--writer-threads", "--batch-size", "--num-workers", "--device", "--output"):
        assert not re.search(rf"{option}\b", shown.split("Options:")[1]), option
    write_demo_shards(tmp_path / "raw", num_samples=4, size=16)
    planned = CliRunner().invoke(flux_prep, ["plan", "--model", str(tiny_model), "--input", str(tmp_path / "raw"),
                                             "--resolution", "16", "--t5-mode", "trimmed", "--compile",
                                             "--writer-threads", "4", "--device", "cpu", "--output", "x", "--json"])
    assert planned.exit_code == 0, planned.output   # encode's command line, run as a plan


def test_a_model_that_is_not_there_exits_2_in_every_command(tmp_path):
    """2: what was given cannot be used (here a model folder), named on one line; the trainer said 1."""
    from train_caches import write_cache
    missing = str(tmp_path / "no-model")
    env_python = [sys.executable, "-m"]
    cache = write_cache(tmp_path / "cache", 8)
    commands = {
        "flux-prep encode": env_python + ["preprocess", "encode", "--model", missing, "--input", str(tmp_path),
                                          "--output", str(tmp_path / "out")],
        "flux-sample": env_python + ["sample", "--model", missing, "--prompt", "x", "--output", str(tmp_path / "s")],
        "python -m train": env_python + ["train", "--data.train_cache", str(cache), "--model.name", missing,
                                         "--model.init", "pretrained", "--run.output_dir", str(tmp_path / "run"),
                                         "--run.max_steps", "1", "--run.precision", "no", "--data.num_workers", "0"],
    }
    for name, command in commands.items():
        run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert run.returncode == 2, f"{name}: exit {run.returncode}\n{run.stderr[-2000:]}"
        assert "no-model" in run.stderr and "Traceback" not in run.stderr, f"{name}: {run.stderr[-2000:]}"
