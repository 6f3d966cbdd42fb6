"""Timing, peak extra memory and the error against a float64 reference.

Time: triton.testing.do_bench on CUDA (median and 20/80% quantiles, L2 flushed between calls); on the CPU a
repeat-and-median timer (after the harness's warm-up call: at least `min_reps` timed calls, more while the time
budget lasts).

Memory ("peak extra"): the peak above what was allocated before the measured call — inputs and weights excluded,
outputs, saved activations and gradients (dW, dH) included.
  CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats.
  CPU:  the process's peak resident set (VmHWM), reset through /proc/self/clear_refs, minus the resident set before
        the call. The harness runs it in a fresh subprocess per provider (memworker.py) with glibc told to give every
        allocation over 64 KiB back to the OS when freed, so that one measurement never hides inside memory kept
        from an earlier one.
"""
from __future__ import annotations

import gc
import math
import signal
import statistics
import time
from contextlib import contextmanager

import torch

from . import ops

MB = 2**20


def backward(inp: ops.Inputs, out, retain_graph=False):
    outs, grads = ops.upstream(inp, out)
    torch.autograd.backward(outs, grads, retain_graph=retain_graph)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------------------------------
# Time
# ----------------------------------------------------------------------------------------------------------------------

def _cpu_timer(run, setup, *, warmup=0, min_reps=3, max_reps=15, budget_s=4.0):
    for _ in range(warmup):
        setup()
        run()
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (len(times) < max_reps and time.perf_counter() - start < budget_s):
        setup()
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) * 1e3)
    return _summary(times)


def _summary(times):
    q = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else [times[0]] * 4
    return dict(ms=statistics.median(times), ms_p20=q[0], ms_p80=q[3], reps=len(times))


def _cuda_timer(run, grad_to_none, *, rep_ms=100):
    try:
        from triton.testing import do_bench
    except ImportError:  # pragma: no cover - CUDA without triton
        do_bench = None
    if do_bench is not None:
        med, p20, p80 = do_bench(run, warmup=25, rep=rep_ms, grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8])
        return dict(ms=med, ms_p20=p20, ms_p80=p80, reps=-1)
    times = []
    for i in range(12):
        for p in grad_to_none:
            p.grad = None
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        torch.cuda.synchronize()
        if i >= 2:
            times.append(a.elapsed_time(b))
    return _summary(times)


def time_mode(mode: str, fwd, inp: ops.Inputs, device: str, *, cpu_budget_s=4.0, min_reps=3):
    """Median time of one mode: 'fwd' (forward with autograd recording, as in training), 'bwd' (backward alone,
    after an untimed forward), 'fwd+bwd'."""
    if device == "cuda":
        if mode == "fwd":
            return _cuda_timer(fwd, inp.params)
        if mode == "fwd+bwd":
            return _cuda_timer(lambda: backward(inp, fwd()), inp.params)
        out = fwd()
        try:
            return _cuda_timer(lambda: backward(inp, out, retain_graph=True), inp.params)
        finally:
            del out
    state = {}

    def setup():
        inp.zero_grad()
        state.clear()
        if mode == "bwd":
            state["out"] = fwd()

    if mode == "fwd":
        run = fwd
    elif mode == "fwd+bwd":
        def run():
            backward(inp, fwd())
    else:
        def run():
            backward(inp, state.pop("out"))
    try:
        return _cpu_timer(run, setup, min_reps=min_reps, budget_s=cpu_budget_s)
    finally:
        state.clear()
        inp.zero_grad()


# ----------------------------------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------------------------------

def _proc_status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0]) * 1024
    return out


def cpu_peak_supported() -> str | None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _proc_status()["VmHWM"]
    except (OSError, KeyError) as e:
        return f"no /proc peak-RSS reset on this OS ({e})"
    return None


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _glibc_release_freed_memory():
    """Make glibc serve every allocation over 64 KiB with its own mmap (returned to the OS on free) and trim the heap,
    so that a buffer freed before the measurement cannot be reused unseen inside it. No-op off glibc."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
        libc.mallopt(_M_TRIM_THRESHOLD, 0)
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _PeakMeter:
    def __init__(self, device):
        self.device = device

    def start(self):
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            _glibc_release_freed_memory()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = _proc_status()["VmRSS"]

    def stop(self) -> float:
        if self.device == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _proc_status()["VmHWM"]
        return max(0, peak - self.base) / MB


def peak_extra_mb(mode: str, fwd, inp: ops.Inputs, device: str) -> float:
    """Peak memory above the starting point of one call of `mode`, in MiB."""
    meter = _PeakMeter(device)
    inp.zero_grad()
    out = None
    try:
        if mode == "bwd":
            out = fwd()
        meter.start()
        if mode == "fwd":
            out = fwd()
        elif mode == "fwd+bwd":
            backward(inp, fwd())
        else:
            backward(inp, out)
            out = None
        return meter.stop()
    finally:
        del out
        inp.zero_grad()
        gc.collect()


# ----------------------------------------------------------------------------------------------------------------------
# Error against float64
# ----------------------------------------------------------------------------------------------------------------------

class Reference:
    """Float64 eager outputs and gradients on a small slice of a case, computed once per (case, output kind)."""

    def __init__(self):
        self._cache = {}

    def get(self, key, inp: ops.Inputs, rows: int, kind: str, cfg):
        k = (key, rows, kind)
        if k not in self._cache:
            ref = ops.slice_inputs(inp, rows, dtype=torch.float64)
            out = ops.eager_forward(inp.op, ref, cfg)
            if kind == "mean":
                out = out.mean()
            backward(ref, out)
            outs = out if isinstance(out, tuple) else (out,)
            self._cache[k] = ([o.detach() for o in outs], [ref.hidden.grad, ref.weight.grad])
        return self._cache[k]


def max_err(a, b) -> float:
    return float((a.detach().double() - b.double()).abs().max()) if a.numel() else 0.0


def error_vs_reference(provider, op, inp: ops.Inputs, device, rows, reference: Reference, key, cfg):
    """(err_out, err_grad): max |provider - float64| over the outputs and over (dH, dW), on the first `rows` tokens."""
    kind = provider.output_kind(op)
    ref_outs, ref_grads = reference.get(key, inp, rows, kind, cfg)
    small = ops.slice_inputs(inp, rows)
    out = provider.make(op, small, device)()
    backward(small, out)
    outs = out if isinstance(out, tuple) else (out,)
    err_out = max(max_err(o, r) for o, r in zip(outs, ref_outs))
    err_grad = max(max_err(g, r) for g, r in zip([small.hidden.grad, small.weight.grad], ref_grads))
    return err_out, err_grad


# ----------------------------------------------------------------------------------------------------------------------
# A time limit for first calls that compile
# ----------------------------------------------------------------------------------------------------------------------

class CompileTimeout(Exception):
    pass


@contextmanager
def time_limit(seconds: float | None):
    """Raise CompileTimeout in the main thread after `seconds` (no-op when None/0 or off the main thread)."""
    import threading

    if not seconds or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGALRM"):
        yield
        return

    def handler(signum, frame):
        raise CompileTimeout(f"first call (compilation) took longer than {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def fmt_err(x):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.1e}"
