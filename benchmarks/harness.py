"""The benchmark loop: every (shape, op) case, every provider, every mode; one row per measurement.

A failing provider never stops the run: its rows carry status "error" (or "oom", "skip") and the reason.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field

import torch

from . import measure, ops, providers
from .registry import Shape

COLUMNS = ["op", "model", "N", "D", "V", "dtype", "device", "provider", "mode", "status", "ms", "ms_p20", "ms_p80",
           "reps", "mem_mb", "ratio", "best_baseline", "time_vs_eager", "mem_vs_eager", "dw_mb", "err_out", "err_grad",
           "note", "reason"]


@dataclass
class Config:
    ops: list[str]
    shapes: list[Shape]
    providers: list[str]
    modes: list[str] = field(default_factory=lambda: list(ops.MODES))
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    seq_len: int = 1024
    seed: int = 0
    inputs: str = "random"  # ops.INPUT_KINDS
    check_rows: int = 64  # 0 disables the error column
    check_compiled: bool = False  # compiled eager has eager's math; its check costs another compilation
    mem: str = "subprocess"  # subprocess | inproc | none (CPU only; CUDA always measures in-process)
    compile_timeout: float = 300.0
    cpu_budget_s: float = 4.0  # timed repetitions per measurement on the CPU
    min_reps: int = 3
    budget_s: float = 0.0  # soft limit for the whole run: later measurements are skipped (0 = none)
    verbose: bool = True


def log(cfg, *a):
    if cfg.verbose:
        print(*a, flush=True)


def _row(cfg: Config, shape: Shape, op: str, prov: str, mode: str, **kw):
    r = dict(op=op, model=shape.model, N=shape.N, D=shape.D, V=shape.V, dtype=ops.DTYPE_NAMES[cfg.dtype],
             device=cfg.device, provider=prov, mode=mode, status="ok", note="", reason="", softcap=shape.softcap)
    r["dw_mb"] = shape.V * shape.D * torch.finfo(cfg.dtype).bits / 8 / measure.MB
    r.update(kw)
    return r


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:200] if msg else ''}"


def _free(device):
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _is_oom(e):
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def run(cfg: Config, on_progress=None) -> list[dict]:
    """All measurements; `on_progress(rows)` is called after each op (to save partial results)."""
    t_start = time.time()
    provs = providers.all_providers()
    unknown = [p for p in cfg.providers if p not in provs]
    if unknown:
        raise ValueError(f"unknown provider(s) {unknown}; known: {', '.join(provs)}")
    chosen = [provs[p] for p in cfg.providers]
    unavailable = {p.name: p.unavailable(cfg.device) for p in chosen}
    for name, why in unavailable.items():
        if why:
            log(cfg, f"[skip] {name}: {why}")
    mem_mode = cfg.mem if cfg.device == "cpu" else "inproc"
    if cfg.device == "cpu" and mem_mode != "none":
        why = measure.cpu_peak_supported()
        if why:
            log(cfg, f"[memory] not measured: {why}")
            mem_mode = "none"

    def over_budget():
        return cfg.budget_s and time.time() - t_start > cfg.budget_s

    rows: list[dict] = []
    for shape in cfg.shapes:
        shape_rows: list[dict] = []
        for op in cfg.ops:
            reference = measure.Reference()  # float64 slice outputs/grads (dW: V x D fp64), freed per op
            log(cfg, f"== {op} {shape.label} {ops.DTYPE_NAMES[cfg.dtype]} {cfg.device}")
            try:
                inp = ops.make_inputs(op, shape.N, shape.D, shape.V, cfg.dtype, cfg.device, seq_len=cfg.seq_len,
                                      seed=cfg.seed, softcap=shape.softcap, inputs=cfg.inputs)
            except Exception as e:  # noqa: BLE001 - e.g. OOM making the inputs
                for p in chosen:
                    shape_rows += [_row(cfg, shape, op, p.name, m, status="error", reason=f"inputs: {_short(e)}")
                                   for m in cfg.modes]
                _free(cfg.device)
                continue
            eager_cfg = None
            if ops.FAMILY[op] == "fused":
                _, eager_cfg = providers.preset_config(ops.PRESET[op])
            for p in chosen:
                shape_rows += _run_provider(cfg, shape, op, p, inp, unavailable[p.name], mem_mode, reference,
                                            eager_cfg, over_budget)
                _free(cfg.device)
            del inp, reference
            _free(cfg.device)
            if on_progress is not None:
                on_progress(rows + shape_rows)
        if mem_mode == "subprocess":
            _subprocess_memory(cfg, shape, chosen, unavailable, shape_rows)
        _ratios(shape_rows)
        rows += shape_rows
    return rows


def _run_provider(cfg, shape, op, p, inp, unavailable, mem_mode, reference, eager_cfg, over_budget):
    why = unavailable or p.unsupported(op, cfg.device) or p.unsupported_case(op, inp)
    if why:
        return [_row(cfg, shape, op, p.name, m, status="skip", reason=why) for m in cfg.modes]
    if over_budget():
        return [_row(cfg, shape, op, p.name, m, status="skip", reason="time budget spent") for m in cfg.modes]
    note = p.note(op, cfg.device)
    out_rows = []
    try:
        fwd = p.make(op, inp, cfg.device)
        t0 = time.time()
        with measure.time_limit(cfg.compile_timeout if p.compiles(cfg.device) else None):
            measure.backward(inp, fwd()) if any("bwd" in m for m in cfg.modes) else fwd()
            measure.sync(cfg.device)
        inp.zero_grad()
        if p.compiles(cfg.device):
            note = (note + "; " if note else "") + f"first call {time.time() - t0:.1f} s"
    except Exception as e:  # noqa: BLE001
        status = "oom" if _is_oom(e) else "error"
        reason = _short(e)
        log(cfg, f"  [{status}] {p.name}: {reason}")
        if status == "error" and cfg.verbose and not isinstance(e, measure.CompileTimeout):
            traceback.print_exc(limit=4, file=sys.stdout)
        inp.zero_grad()
        return [_row(cfg, shape, op, p.name, m, status=status, reason=reason, note=note) for m in cfg.modes]

    for mode in cfg.modes:
        if over_budget():
            out_rows.append(_row(cfg, shape, op, p.name, mode, status="skip", reason="time budget spent"))
            continue
        r = _row(cfg, shape, op, p.name, mode, note=note)
        try:
            r.update(measure.time_mode(mode, fwd, inp, cfg.device, cpu_budget_s=cfg.cpu_budget_s,
                                       min_reps=cfg.min_reps))
            if mem_mode == "inproc":
                r["mem_mb"] = measure.peak_extra_mb(mode, fwd, inp, cfg.device)
        except Exception as e:  # noqa: BLE001
            r.update(status="oom" if _is_oom(e) else "error", reason=_short(e))
            inp.zero_grad()
            _free(cfg.device)
        out_rows.append(r)
        log(cfg, f"  {p.name:11s} {mode:8s} " + (f"{r['ms']:9.2f} ms" if "ms" in r else r["status"])
            + (f"  {r['mem_mb']:9.1f} MiB" if r.get("mem_mb") is not None else ""))

    if cfg.check_rows and (cfg.check_compiled or not p.is_compiled_eager(cfg.device)) and not over_budget():
        try:
            key = (op, shape)
            e_out, e_grad = measure.error_vs_reference(p, op, inp, cfg.device, cfg.check_rows, reference, key,
                                                       eager_cfg)
            for r in out_rows:
                r.update(err_out=e_out, err_grad=e_grad)
        except Exception as e:  # noqa: BLE001
            log(cfg, f"  [error check] {p.name}: {_short(e)}")
            for r in out_rows:
                r["note"] = (r["note"] + "; " if r["note"] else "") + f"error check failed: {_short(e)}"
    return out_rows


def _subprocess_memory(cfg: Config, shape: Shape, chosen, unavailable, shape_rows):
    """CPU peak extra memory, one fresh interpreter per provider (all ops and modes of this shape in it)."""
    todo = {}
    for r in shape_rows:
        if r["status"] == "ok":
            todo.setdefault(r["provider"], set()).add(r["op"])
    for p in chosen:
        if p.name not in todo:
            continue
        spec = dict(ops=[o for o in cfg.ops if o in todo[p.name]], shape=[shape.model, shape.N, shape.D, shape.V],
                    provider=p.name, modes=cfg.modes, dtype=ops.DTYPE_NAMES[cfg.dtype], seq_len=cfg.seq_len,
                    seed=cfg.seed, compile_timeout=cfg.compile_timeout, inputs=cfg.inputs)
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
        log(cfg, f"[memory] {p.name} {shape.label}: fresh subprocess")
        try:
            proc = subprocess.run([sys.executable, "-m", "benchmarks.memworker", json.dumps(spec)],
                                  capture_output=True, text=True, env=env, timeout=1800,
                                  cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
            if proc.returncode != 0 and not results:
                raise RuntimeError((proc.stderr.strip().splitlines() or ["no output"])[-1])
        except Exception as e:  # noqa: BLE001
            log(cfg, f"  [memory] {p.name}: {_short(e)}")
            continue
        by_key = {(x["op"], x["mode"]): x for x in results}
        for r in shape_rows:
            x = by_key.get((r["op"], r["mode"]))
            if r["provider"] == p.name and x is not None:
                if "mem_mb" in x:
                    r["mem_mb"] = x["mem_mb"]
                else:
                    r["note"] = (r["note"] + "; " if r["note"] else "") + f"memory: {x.get('error')}"


def _ratios(rows):
    groups = {}
    for r in rows:
        groups.setdefault((r["op"], r["model"], r["N"], r["D"], r["V"], r["mode"]), []).append(r)
    for g in groups.values():
        base = [r for r in g if r["status"] == "ok" and r["provider"] in providers.BASELINES and "ms" in r]
        eager = next((r for r in g if r["provider"] == "eager" and r["status"] == "ok"), None)
        best = min(base, key=lambda r: r["ms"]) if base else None
        for r in g:
            if r["status"] != "ok":
                continue
            if best is not None and "ms" in r:
                r["ratio"] = r["ms"] / best["ms"]
                r["best_baseline"] = best["provider"]
            if eager is not None and "ms" in r and "ms" in eager:
                r["time_vs_eager"] = r["ms"] / eager["ms"]
            if eager is not None and r.get("mem_mb") is not None and eager.get("mem_mb"):
                r["mem_vs_eager"] = r["mem_mb"] / eager["mem_mb"]
