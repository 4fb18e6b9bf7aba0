"""bench/kernels.py's steady-state busy share: overlapping kernels count once, gaps show."""
import importlib.util
from pathlib import Path

import pytest

# Loaded by path: bench/ on sys.path would shadow the `sample` package with bench/sample.py.
_spec = importlib.util.spec_from_file_location(
    "bench_kernels", Path(__file__).resolve().parents[1] / "bench" / "kernels.py")
_kernels = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_kernels)
tail_busy = _kernels.tail_busy


def test_overlaps_count_once_and_gaps_show():
    spans = [(0, 10), (5, 15), (20, 30)]
    assert tail_busy(spans, 1.0) == pytest.approx(25 / 30)


def test_only_the_tail_is_looked_at():
    spans = [(20, 30), (0, 10), (5, 15)]              # any order
    assert tail_busy(spans, 0.5) == pytest.approx(10 / 15)   # 15..30: idle 15..20, busy 20..30
    assert tail_busy([(0, 12), (13, 20)], 0.5) == pytest.approx(9 / 10)


def test_nothing_profiled_is_zero():
    assert tail_busy([], 0.4) == 0.0
