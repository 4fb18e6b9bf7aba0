"""bench/encode_fp8.py (issue 29: encode with --text-precision fp8) at toy size on the CPU: every section runs,
the fp8 rows report their difference from bf16 on the same prompts, small but not zero. The GPU's figures
are docs/BENCHMARKS.md's."""
import importlib.util
import re
from pathlib import Path

import pytest

pytest.importorskip("torchao.float8", reason="fp8 needs torchao (the dev extra installs it)")
BENCH = Path(__file__).resolve().parents[1] / "bench"
_spec = importlib.util.spec_from_file_location("bench_encode_fp8", BENCH / "encode_fp8.py")
encode_fp8 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(encode_fp8)


def test_every_section_runs_tiny_and_fp8_rows_state_their_difference(tmp_path, monkeypatch):
    monkeypatch.setattr(encode_fp8, "RESULTS", [])
    encode_fp8.main(["--device", "cpu", "--tiny", "--out", str(tmp_path / "work"),
                     "--results", str(tmp_path / "rows.md")])
    rows = [line.split("|")[1:-1] for line in (tmp_path / "rows.md").read_text().splitlines()[4:]]
    sections = {r[0].strip() for r in rows}
    assert {"T5", "encode", "pipeline", "disk", "Qwen3"} <= sections
    assert all(float(r[2]) > 0 for r in rows)
    fp8 = [r for r in rows if r[0].strip() in ("T5", "Qwen3") and "fp8" in r[1]]
    assert len(fp8) == 3   # T5 without and with wo, Qwen3
    for r in fp8:
        error = float(re.search(r"relative error ([0-9.]+)", r[4]).group(1))
        cosine = float(re.search(r"cosine per token min ([0-9.]+)", r[4]).group(1))
        assert 1e-4 < error < 0.2 and 0.95 < cosine < 1.0, r
