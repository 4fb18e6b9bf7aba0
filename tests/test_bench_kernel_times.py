"""bench/kernel_times.py's steady-state busy share: overlapping kernels count once, gaps show."""
import importlib.util
import time
from pathlib import Path

import pytest

# Loaded by path: bench/ on sys.path would shadow the `sample` package with bench/sample.py.
_spec = importlib.util.spec_from_file_location(
    "bench_kernels", Path(__file__).resolve().parents[1] / "bench" / "kernel_times.py")
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


def _sampled(lines: str, since=None):
    sampler = _kernels.ClockSampler(0, command=["sh", "-c", f"printf '{lines}'"])
    sampler.proc.wait()          # the fake source has printed everything
    sampler.reader.join(timeout=5)
    return sampler.stop(since), sampler


def test_clock_sampler_means_and_power_cap_share():
    clock, sampler = _sampled("1410, 697.5, Active\\n[N/A], [N/A], Not Active\\n1380, 690.5, Not Active\\n")
    assert len(sampler.samples) == 2
    assert (clock["mhz"], clock["watts"], clock["capped"]) == pytest.approx((1395.0, 694.0, 0.5))
    assert clock["samples"] == 2


def test_clock_means_keep_the_samples_since():
    samples = [(0.0, 1980.0, 100.0, False), (5.0, 1500.0, 650.0, True), (10.0, 1400.0, 700.0, True)]
    assert _kernels.clock_means(samples, 5.0) == pytest.approx({"mhz": 1450.0, "watts": 675.0, "capped": 1.0,
                                                                 "samples": 2})
    assert _kernels.clock_means(samples, None)["capped"] == pytest.approx(2 / 3)
    assert _kernels.clock_means(samples, 11.0) is None
    assert _kernels.clock_means(samples, None, 5.0) == pytest.approx({"mhz": 1740.0, "watts": 375.0, "capped": 0.5,
                                                                       "samples": 2})


def test_clock_sampler_without_a_source_samples_nothing():
    assert _kernels.ClockSampler(0, command=["/nonexistent/nvidia-smi"]).stop() is None
    assert _sampled("")[0] is None


def test_sustained_calls_back_to_back_for_the_time_given():
    calls = []
    seconds, _ = _kernels.sustained(lambda: calls.append(time.sleep(0.005)), 0.1, warmup=2)
    timed = len(calls) - 2                                   # the warm-up calls are not timed
    assert timed >= 5 and seconds >= 0.005
    assert seconds * timed == pytest.approx(0.1, abs=0.05)   # about the time given, whole calls
