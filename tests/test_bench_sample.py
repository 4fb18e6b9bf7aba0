"""bench/sample.py on the CPU at toy size, both families: every selected row runs in one process (float8
last), a variant that fails is a row with its error and the rest still run, the rows are written as each
ends; the loop's bf16 latents are the plain diffusers pipeline loop's (FluxPipeline's; Flux2KleinPipeline's
two CFG calls per step against our one batched call), float8's close but not equal. The timings are the
GPU's (the command in bench/sample.py's docstring)."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("torchao.float8", reason="the fp8 rows need torchao (the dev extra installs it)")
BENCH = Path(__file__).resolve().parents[1] / "bench"

# Loaded by path: bench/ on sys.path would shadow the `sample` package with bench/sample.py.
_spec = importlib.util.spec_from_file_location("bench_sample", BENCH / "sample.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench   # (its dataclass looks its module up there)
_spec.loader.exec_module(bench)


@pytest.mark.parametrize("family", ["flux1", "flux2"])
def test_rows_run_compare_and_are_written(family, tmp_path):
    rows = bench.main(["--device", "cpu", "--tiny", "--family", family, "--steps", "2", "--warmup-steps", "1",
                       "--variants", "fp8,_native_cudnn,compile", "--out", str(tmp_path)])
    by = {r["name"]: r for r in rows}
    assert [r["name"] for r in rows] == ["diffusers eager", "eager", "_native_cudnn", "compile", "fp8"]
    assert by["_native_cudnn"]["error"] and by["_native_cudnn"]["s_per_step"] is None   # no cuDNN on a CPU
    assert all(not by[n]["error"] and by[n]["s_per_step"] > 0 for n in ("eager", "compile", "fp8"))
    assert by["eager"]["max_abs_dx_vs_diffusers"] < 1e-4 and by["compile"]["latent_rel_diff_vs_bf16"] < 1e-5
    assert 1e-4 < by["fp8"]["latent_rel_diff_vs_bf16"] < 2 ** -4   # float8's rounding (tests/test_sample_float8.py)
    assert by["fp8"]["mean_abs_px_diff_vs_bf16"] > 0
    written = json.loads((tmp_path / f"sample-{family}.json").read_text())
    assert written["rows"] == rows and written["family"] == family
