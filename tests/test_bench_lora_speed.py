"""bench/memory.py --suite lora's speed rows (issue 29: float8 compute under the adapter, run.compile) on the
CPU at toy size: the plain loop, the bf16 base and fp8 compute run end to end; the run.compile rows are
skipped on a CPU by the rule the benchmark states (device_cannot); the real rows are valid trainer configs,
with the names the lead's command selects. The figures themselves are the GPU's."""
import importlib.util
import math
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
_spec = importlib.util.spec_from_file_location("bench_memory", BENCH / "memory.py")
memory = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(memory)

SPEED = ["plain loop, bf16 base", "bf16 base", "fp8 compute", "fp8 compute, compile", "bf16 base, compile"]

pytest.importorskip("torchao.float8", reason="fp8 needs torchao (the dev extra installs it)")


def test_speed_rows_run_tiny_on_a_cpu_and_compile_rows_are_skipped(tmp_path):
    results = memory.main(["--suite", "lora", "--device", "cpu", "--tiny", "--same-process", "--only", ";".join(SPEED),
                           "--root", str(tmp_path / "state"), "--out", str(tmp_path / "out")])
    by_name = {r["name"]: r for r in results}
    assert [r["name"] for r in results] == SPEED
    for name in SPEED:
        r = by_name[name]
        if r.get("config", {}).get("run.compile"):
            assert r["skipped"] and r["error"] == "skipped: run.compile rows run on CUDA only"
            continue
        assert "error" not in r, r.get("error")
        assert r["img_s"] > 0 and len(r["losses"]) == r["warmup"] + r["steps"]
        assert all(math.isfinite(x) for x in r["losses"])
    # the plain loop's peft adapter is the trainer's, parameter for parameter, on either base
    assert by_name["plain loop, bf16 base"]["trainable"] == by_name["fp8 compute"]["trainable"] > 0
    table = (tmp_path / "out" / "table.txt").read_text()
    assert ">=1.5x#1 img/s" in table and "skipped" in table


def test_real_speed_rows_are_valid_trainer_configs(tmp_path):
    from train.config import load_config
    rows = memory.rows("lora", False)
    names = [r["name"] for r in rows]
    assert names[:len(SPEED)] == SPEED
    for r in rows[:len(SPEED)]:
        assert r["res"] == 1024 and not r.get("tiny") and r.get("goal", {}).get("img_s_of", SPEED[0]) in names
        if r["kind"] == "trainer":
            cfg = load_config(None, memory.trainer_settings(r, tmp_path / "cache", tmp_path / "work"))
            assert cfg.lora.rank == 16 and cfg.model.name == "flux-dev" and cfg.run.grad_checkpointing
            assert (cfg.run.precision, cfg.run.compile) == ("fp8" if "fp8" in r["name"] else "bf16",
                                                            "compile" in r["name"])
    assert sum(r["est_s"] for r in rows[:len(SPEED)]) <= 500    # the lead's one call: --budget 500
    fidelity = {r["name"]: r for r in memory.rows("fidelity", False)}
    assert fidelity["LoRA, fp8 compute"]["config"]["run.precision"] == "fp8"
    assert fidelity["LoRA, fp8 compute"]["same_as"] == "LoRA, bf16 base"
