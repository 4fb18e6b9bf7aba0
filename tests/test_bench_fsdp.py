"""The FSDP benchmarks need GPUs (bench/train_fsdp.py has a CPU smoke mode, run by hand: two launches):
their arguments parse, each row's command launches with the shipped configs/accelerate/fsdp.yaml or
without it, and the trainer settings they write are a valid trainer config."""
import importlib.util
from pathlib import Path

import pytest

from train.config import load_config

BENCH = Path(__file__).resolve().parents[1] / "bench"
FSDP_CONFIG = str(BENCH.parent / "configs/accelerate/fsdp.yaml")


def load(name):
    # Loaded by path: bench/ on sys.path would shadow the `sample` package with bench/sample.py.
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_fsdp_rows_on_one_gpu_and_the_12b_on_eight(tmp_path):
    bench = load("train_fsdp")
    args = bench.parse_args([])
    assert args.rows == ["plain", "fsdp2"] and args.num_processes == 1 and args.precision == "bf16"
    fsdp = bench.launch_command("fsdp2", args, tmp_path / "s.json", 29500)
    plain = bench.launch_command("plain", args, tmp_path / "s.json", 29500)
    assert fsdp[fsdp.index("--config_file") + 1] == FSDP_CONFIG and "--config_file" not in plain
    assert fsdp[fsdp.index("--num_processes") + 1] == plain[plain.index("--num_processes") + 1] == "1"
    reduced = load_config(None, bench.trainer_settings(args, tmp_path / "cache", tmp_path / "run"))
    assert reduced.model.name == "flux-schnell" and reduced.model.overrides == {"num_layers": 4,
                                                                                 "num_single_layers": 8}

    full = bench.parse_args(["--full", "--num-processes", "8", "--lora", "16"])
    assert full.rows == ["fsdp2"] and full.grad_checkpointing
    command = bench.launch_command("fsdp2", full, tmp_path / "s.json", 29500)
    assert command[:4] == ["accelerate", "launch", "--config_file", FSDP_CONFIG]
    assert command[command.index("--num_processes") + 1] == "8"
    cfg = load_config(None, bench.trainer_settings(full, tmp_path / "cache", tmp_path / "run"))
    assert cfg.model.name == "flux-dev" and not cfg.model.overrides and cfg.lora.rank == 16
    assert cfg.run.precision == "bf16" and cfg.run.grad_checkpointing

    with pytest.raises(SystemExit):   # one CPU process gets no FSDP from accelerate
        bench.parse_args(["--device", "cpu", "--num-processes", "1"])


def test_fsdp_smoke_launches_the_shipped_config(tmp_path):
    smoke = load("fsdp_smoke")
    args = smoke.parse_args(["FULL_STATE_DICT", "--lora", "4", "--ema", "0.9"])
    command = smoke.launch_command(tmp_path / "cfg.yaml", args)
    assert command[command.index("--config_file") + 1] == FSDP_CONFIG
    assert command[command.index("--fsdp_state_dict_type") + 1] == "FULL_STATE_DICT"
    cfg = load_config(smoke.write_config(tmp_path, tmp_path / "cache", 4, None, args))
    assert (cfg.lora.rank, cfg.ema.decay, cfg.run.precision, cfg.run.max_steps) == (4, 0.9, "bf16", 4)
