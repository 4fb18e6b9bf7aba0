"""GPU time by kernel kind, from torch.profiler: where a benchmark's device time goes.

`KernelTimes` profiles CUDA kernels only (no shapes, no stacks: little overhead) while enabled,
and sorts each kernel into a kind by its name. Kernels of several streams may overlap, so the
kinds' sum can exceed the wall time; `busy` over the wall time is still a fair sign of how
much the device idles when most work runs on one stream. `tail_busy` measures idling directly:
the share of the run's last part (past warm-up) in which some compute kernel runs.

`ClockSampler` samples the GPU's SM clock and board power by nvidia-smi. A board at its power cap
runs every kernel at a lower clock; a run that keeps the GPU busy holds it at the cap. `sustained`
times a call run back to back for some seconds, with the clock meanwhile.
"""
from __future__ import annotations

import subprocess
import threading
import time

import torch

# First match wins: cuBLAS/cuDNN names carry "gemm" or H100's nvjet/xmma; attention kernels
# name flash, fmha or attention; inductor's fused kernels start with triton_.
KINDS = (
    ("attention", ("flash", "fmha", "attention", "attn")),
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "gemv", "sm90_", "sm80_")),
    ("convolution", ("conv", "implicit", "winograd", "cudnn")),
    ("optimizer", ("adam", "multi_tensor")),
    ("triton (fused)", ("triton",)),
    ("copy", ("memcpy", "memset")),
    ("eager elementwise/reduce", ("elementwise", "reduce", "vectorized", "index", "cat", "copy")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


# The share of the profiled span, at its end, where `tail_busy` looks: past model loading,
# compilation and warm-up where the steady part is over a quarter of the run (bench/encode.py's
# padded-256 pipeline at 6144 images: about 30 of 80 s).
TAIL = 0.25


def tail_busy(spans: list[tuple[float, float]], tail: float) -> float:
    """Share of the last `tail` of the time covered by `spans` (start, end) during which at least one
    span runs: overlapping kernels of several streams count once, and idle gaps show."""
    if not spans:
        return 0.0
    spans = sorted(spans)
    end = max(e for _, e in spans)
    lo = end - tail * (end - spans[0][0])
    busy, cur_s, cur_e = 0.0, lo, lo   # the run of overlapping spans being merged
    for s, e in spans:
        s, e = max(s, lo), max(e, lo)
        if s > cur_e:                   # a gap: the merged run ends
            busy += cur_e - cur_s
            cur_s = s
        cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    return busy / (end - lo) if end > lo else 0.0


class KernelTimes:
    """with KernelTimes() as k: ...; then k.seconds (kind -> GPU s), k.wall, k.top (slowest kernels)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and torch.cuda.is_available()
        self.seconds: dict[str, float] = {}
        self.top: list[tuple[str, float, int]] = []
        self.wall = 0.0
        self.tail_busy = 0.0

    def __enter__(self):
        if self.enabled:
            torch.cuda.synchronize()
            self._prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
            self._prof.__enter__()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if not self.enabled:
            return False
        torch.cuda.synchronize()
        self.wall = time.perf_counter() - self._t0
        self._prof.__exit__(*exc)
        per_name: dict[str, list] = {}   # name -> [seconds, calls, kind]
        spans = []
        for evt in self._prof.events():
            if evt.device_type != torch.autograd.DeviceType.CUDA:
                continue
            s = evt.device_time_total / 1e6 if hasattr(evt, "device_time_total") else evt.cuda_time_total / 1e6
            entry = per_name.get(evt.name) or per_name.setdefault(evt.name, [0.0, 0, kind_of(evt.name)])
            entry[0] += s
            entry[1] += 1
            if entry[2] != "copy":
                spans.append((evt.time_range.start, evt.time_range.end))
        for s, _, kind in per_name.values():
            self.seconds[kind] = self.seconds.get(kind, 0.0) + s
        self.top = sorted(((n, s, c) for n, (s, c, _) in per_name.items()), key=lambda x: -x[1])[:12]
        self.tail_busy = tail_busy(spans, TAIL)
        return False

    @property
    def busy(self) -> float:
        return sum(self.seconds.values())

    def report(self, title: str, per: float = 1.0, per_unit: str = "") -> str:
        """A table of the kinds (share of kernel time, ms per `per` units) and the slowest kernels."""
        if not self.enabled or not self.seconds:
            return f"{title}: no CUDA kernels profiled"
        busy = self.busy
        lines = [f"{title}: kernels {busy:.3f} s over {self.wall:.3f} s wall ({100 * busy / self.wall:.0f}% busy); "
                 f"in the last {100 * TAIL:.0f}% of the span (past warm-up) compute kernels ran "
                 f"{100 * self.tail_busy:.1f}% of the time",
                 f"| kind | share | ms{per_unit} |", "|---|---:|---:|"]
        for kind, s in sorted(self.seconds.items(), key=lambda x: -x[1]):
            lines.append(f"| {kind} | {100 * s / busy:.1f}% | {1e3 * s / per:.3f} |")
        lines.append("slowest kernels (total s, calls):")
        lines += [f"  {s:8.3f}  {c:6d}  {kind_of(n):<14} {n[:110]}" for n, s, c in self.top]
        return "\n".join(lines)


class ClockSampler:
    """Samples one GPU's SM clock (MHz), board power (W) and whether its software power cap holds
    the clock down, every `period_ms`, by nvidia-smi, until `stop()`. Without nvidia-smi (or on a
    driver that lacks these fields) it samples nothing."""

    QUERY = "--query-gpu=clocks.sm,power.draw,clocks_event_reasons.sw_power_cap"

    def __init__(self, index: int, period_ms: int = 200, command: list[str] | None = None):
        """`command`: what prints "clock, power, Active|Not Active" lines instead of nvidia-smi (tests)."""
        self.samples: list[tuple[float, float, float, bool]] = []   # (perf_counter time, MHz, W, capped)
        cmd = command or ["nvidia-smi", f"--id={index}", self.QUERY, "--format=csv,noheader,nounits",
                          f"-lms={period_ms}"]
        try:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            self.proc = None
            return
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            fields = [f.strip() for f in line.split(",")]
            try:
                clock, power = float(fields[0]), float(fields[1])
            except (ValueError, IndexError):   # "[N/A]" where a board does not report one
                continue
            self.samples.append((time.perf_counter(), clock, power, fields[2:3] == ["Active"]))

    def stop(self, since: float | None = None, until: float | None = None) -> dict | None:
        """{"mhz", "watts", "capped" (share of samples at the power cap), "samples"} over the samples
        taken between perf_counter times `since` and `until` (None: no bound); None if none was."""
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()
            self.reader.join(timeout=2)
        return clock_means(self.samples, since, until)


def clock_means(samples: list[tuple[float, float, float, bool]], since: float | None = None,
                until: float | None = None) -> dict | None:
    kept = [s for s in samples if (since is None or s[0] >= since) and (until is None or s[0] <= until)]
    if not kept:
        return None
    n = len(kept)
    return {"mhz": sum(s[1] for s in kept) / n, "watts": sum(s[2] for s in kept) / n,
            "capped": sum(s[3] for s in kept) / n, "samples": n}


def sustained(fn, seconds: float, warmup: int = 3) -> tuple[float, dict | None]:
    """Seconds per call of `fn`, called back to back for about `seconds` after `warmup` calls (long
    enough for a GPU's clock to settle under its power cap), and ClockSampler's means meanwhile
    (None without a GPU or nvidia-smi). Waits for the current CUDA device, where there is one."""
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    clocks = ClockSampler(torch.cuda.current_device()) if cuda else None
    t0, calls = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        fn()
        calls += 1
    sync()
    elapsed = time.perf_counter() - t0
    return elapsed / calls, clocks.stop() if clocks else None
