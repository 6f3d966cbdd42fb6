"""Results: the printed table, CSV + JSON with the machine, versions and date, and a PNG (time and memory vs tokens,
one line per provider)."""
from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import os
import platform
import subprocess

import torch

from . import providers
from .harness import COLUMNS
from .measure import fmt_err


def machine_info(device: str) -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info = dict(
        date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        host=platform.node(),
        platform=platform.platform(),
        python=platform.python_version(),
        cpu=cpu,
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        device=device,
        gpu=torch.cuda.get_device_name(0) if device == "cuda" and torch.cuda.is_available() else None,
        cuda=torch.version.cuda,
        loadavg=_loadavg(),
        versions={d: providers.version_of(d) for d in
                  ["torch", "triton", "numpy", "dph", "liger-kernel", "cut-cross-entropy"]},
    )
    try:
        info["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                     timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git"] = None
    return info


def _loadavg():
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def machine_line(meta: dict) -> str:
    where = meta["gpu"] or f"{meta['cpu']} ({meta['torch_threads']} threads, load {meta.get('loadavg') or 0:.1f})"
    v = meta["versions"]
    return f"{where}; torch {v['torch']}, triton {v['triton']}; {meta['date']}"


def _f(x, spec):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def format_table(rows: list[dict]) -> str:
    """One block per (op, shape, dtype, mode): providers with median ms [p20-p80], peak extra MiB, ratios, errors."""
    out = []
    groups = {}
    for r in rows:
        groups.setdefault((r["op"], r["model"], r["N"], r["D"], r["V"], r["dtype"], r["mode"]), []).append(r)
    for (op, model, N, D, V, dt, mode), g in groups.items():
        name = f"{model} " if model != "custom" else ""
        out.append(f"\n{op}  {name}N={N} D={D} V={V} {dt}  {mode}   (dW = {g[0]['dw_mb']:.0f} MiB)")
        out.append(f"  {'provider':11s} {'median ms':>10s} {'[p20 - p80]':>19s} {'peak MiB':>9s} {'x best':>7s}"
                   f" {'t/eager':>7s} {'mem/eager':>9s} {'err out':>8s} {'err grad':>8s}")
        skipped = []
        for r in g:
            if r["status"] == "skip":
                skipped.append(r["provider"])
                continue
            if r["status"] != "ok":
                out.append(f"  {r['provider']:11s} {r['status']}: {r.get('reason', '')}")
                continue
            band = f"[{_f(r.get('ms_p20'), '.2f')} - {_f(r.get('ms_p80'), '.2f')}]"
            out.append(f"  {r['provider']:11s} {_f(r.get('ms'), '10.2f')} {band:>19s} {_f(r.get('mem_mb'), '9.1f')}"
                       f" {_f(r.get('ratio'), '7.2f')} {_f(r.get('time_vs_eager'), '7.2f')}"
                       f" {_f(r.get('mem_vs_eager'), '9.3f')}"
                       f" {fmt_err(r.get('err_out')):>8s} {fmt_err(r.get('err_grad')):>8s}")
        if skipped:
            out.append(f"  (skipped: {', '.join(skipped)})")
    goals = format_goals(rows)
    if goals:
        out.append(goals)
    reasons = {}
    for r in rows:
        if r["status"] == "skip":
            reasons.setdefault((r["provider"], r.get("reason", "")), []).append(r["op"])
    if reasons:
        out.append("\nskipped:")
        for (prov, why), op_list in reasons.items():
            out.append(f"  {prov} [{', '.join(dict.fromkeys(op_list))}]: {why}")
    return "\n".join(out)


def format_goals(rows: list[dict]) -> str:
    """The benchmark issue's goals, case by case, for forward+backward: the chunked torch path within 1.0x eager's
    time and 15 % of its peak extra memory (CPU); the Triton path within 0.8x the fastest other provider and
    size(dW) + 64 MiB (CUDA)."""
    out = []
    for r in rows:
        if r["mode"] != "fwd+bwd" or r["status"] != "ok":
            continue
        case = f"{r['op']:11s} {r['model'] + ' ' if r['model'] != 'custom' else ''}N={r['N']} D={r['D']} V={r['V']}"
        if r["provider"] == "dph-torch" and r["device"] == "cpu":
            t, m = r.get("time_vs_eager"), r.get("mem_vs_eager")
            out.append(f"  {case:44s} dph-torch  time {_f(t, '.2f')}x eager {_mark(t, 1.0)}"
                       f"   memory {_f(m, '.3f')} of eager {_mark(m, 0.15)}")
        elif r["provider"] == "dph-triton" and r["device"] == "cuda":
            t, mem, cap = r.get("ratio"), r.get("mem_mb"), r["dw_mb"] + 64
            out.append(f"  {case:44s} dph-triton time {_f(t, '.2f')}x best {_mark(t, 0.8)}"
                       f"   memory {_f(mem, '.0f')} MiB vs dW + 64 = {cap:.0f} {_mark(mem, cap)}")
    return "\ngoals (fwd+bwd):\n" + "\n".join(out) if out else ""


def _mark(x, limit):
    return "-" if x is None else ("ok" if x <= limit else "MISS")


def write(rows: list[dict], meta: dict, out_dir: str, tag: str, plot: bool = True) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    paths = dict(csv=os.path.join(out_dir, f"{tag}.csv"), json=os.path.join(out_dir, f"{tag}.json"))
    with open(paths["csv"], "w", newline="") as f:
        f.write(f"# dph benchmarks: {machine_line(meta)}\n")
        w = csv.DictWriter(f, fieldnames=COLUMNS + ["machine", "date"], extrasaction="ignore")
        w.writeheader()
        where = meta["gpu"] or meta["cpu"]
        for r in rows:
            w.writerow({**{k: _csv_val(r.get(k)) for k in COLUMNS}, "machine": where, "date": meta["date"]})
    with open(paths["json"], "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1, default=str)
    if plot:
        try:
            paths["png"] = plot_rows(rows, meta, os.path.join(out_dir, f"{tag}.png"))
        except Exception as e:  # noqa: BLE001 - a missing matplotlib must not lose the numbers
            print(f"[plot] skipped: {type(e).__name__}: {e}")
    return paths


def _csv_val(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else v


def plot_rows(rows: list[dict], meta: dict, path: str) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok" and "ms" in r]
    if not ok:
        return None
    mode_pref = ["fwd+bwd", "fwd", "bwd"]
    panels = []  # one row of panels per op, at its most informative mode
    for op in dict.fromkeys(r["op"] for r in ok):
        modes = {r["mode"] for r in ok if r["op"] == op}
        mode = next(m for m in mode_pref if m in modes)
        panels.append((op, mode))
    colors = {p: f"C{i}" for i, p in enumerate(providers.ALL)}
    fig, axes = plt.subplots(len(panels), 2, figsize=(11, 3.2 * len(panels)), squeeze=False)
    for i, (op, mode) in enumerate(panels):
        sel = [r for r in ok if r["op"] == op and r["mode"] == mode]
        cases = sorted({(r["model"], r["D"], r["V"], r["N"]) for r in sel}, key=lambda c: (c[0], c[1], c[2], c[3]))
        xlabels = [f"{m if m != 'custom' else f'D={d},V={v}'}\nN={n}" for m, d, v, n in cases]
        for prov in dict.fromkeys(r["provider"] for r in sel):
            pts = {(r["model"], r["D"], r["V"], r["N"]): r for r in sel if r["provider"] == prov}
            for j, (key, col) in enumerate((("ms", "median time (ms)"), ("mem_mb", "peak extra memory (MiB)"))):
                ys = [pts[c].get(key) if c in pts else None for c in cases]
                ys = [float("nan") if y is None else y for y in ys]
                axes[i][j].plot(range(len(cases)), ys, marker="o", label=prov, color=colors.get(prov))
                axes[i][j].set_ylabel(col)
        for j in range(2):
            ax = axes[i][j]
            ax.set_title(f"{op} ({mode}, {sel[0]['dtype']})", fontsize=10)
            ax.set_xticks(range(len(cases)), xlabels, fontsize=8)
            vals = [y for line in ax.get_lines() for y in line.get_ydata() if y == y and y > 0]
            if vals and max(vals) > 20 * min(vals):
                ax.set_yscale("log")
            else:
                ax.set_ylim(bottom=0)
            ax.grid(True, which="both", alpha=0.3)
        axes[i][0].legend(fontsize=8)
    fig.suptitle(f"dph benchmarks — {machine_line(meta)}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.25 / len(panels)))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
