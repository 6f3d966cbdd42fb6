"""dph kernel benchmarks, side by side with torch eager, torch.compile, Liger-Kernel and Cut Cross-Entropy.

    python -m benchmarks                         # the issue's table for this machine (CPU or CUDA), every op
    python -m benchmarks --ops logprob --modes fwd+bwd --models llama3-8b --tokens 4096,8192
    python -m benchmarks --shape 4096,512,32768 --providers dph-torch,eager --mem inproc
    dph-bench ...                                # the same, as an installed entry point

Writes <out>/<tag>.{csv,json,png} and prints the table last. Without --out every run gets a fresh folder
runs/bench/<tag>_<YYYYmmdd_HHMMSS> (under the current directory), so the committed results in benchmarks/results
change only when asked: `make bench` = `python -m benchmarks --out benchmarks/results`.
"""
from __future__ import annotations

import argparse
import faulthandler
import os
import sys
import time

import torch

from . import harness, ops, providers, registry, report

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")  # the committed results (make bench)
FRESH = os.path.join("runs", "bench")  # default: a new folder <tag>_<time> here per run


def _csv(text):
    return [x.strip() for x in text.split(",") if x.strip()]


def build_parser():
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", default=",".join(ops.OPS), help=f"comma list of {', '.join(ops.OPS)} (default: all)")
    p.add_argument("--modes", default=None,
                   help="comma list of fwd, bwd, fwd+bwd (default: all on cuda; fwd,fwd+bwd on cpu, where bwd alone "
                        "costs as much as fwd+bwd to measure)")
    p.add_argument("--providers", default=",".join(providers.ALL),
                   help=f"comma list of {', '.join(providers.ALL)} (default: all; missing ones are skipped)")
    p.add_argument("--models", default=None, help=f"comma list from the registry: {', '.join(registry.MODELS)}")
    p.add_argument("--tokens", default="4096,8192,16384", help="token counts N for --models (default %(default)s)")
    p.add_argument("--shape", action="append", default=[], metavar="N,D,V", help="a custom shape (repeatable)")
    p.add_argument("--case", action="append", default=[], metavar="MODEL:N",
                   help="one registry model at one token count, e.g. gemma2-2b:8192 (repeatable)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--dtype", choices=list(ops.DTYPES), default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--seq-len", type=int, default=1024, help="sequence length T of the fused loss (B = N / T)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--check-rows", type=int, default=64, help="tokens in the float64 error check (0: off)")
    p.add_argument("--check-compiled", action="store_true", help="also error-check torch.compile'd eager code")
    p.add_argument("--mem", choices=["subprocess", "inproc", "none"], default="subprocess",
                   help="CPU peak memory: a fresh subprocess per provider (default), in this process, or off")
    p.add_argument("--compile-timeout", type=float, default=None,
                   help="seconds allowed for a compiling first call (default 300 cpu / 240 cuda)")
    p.add_argument("--cpu-budget", type=float, default=4.0, help="CPU seconds of timed repetitions per measurement")
    p.add_argument("--min-reps", type=int, default=3, help="CPU minimum timed repetitions")
    p.add_argument("--budget", type=float, default=0.0, help="soft time limit for the whole run in seconds (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--inputs", choices=list(ops.INPUT_KINDS), default="random",
                   help="the head: random (near-uniform softmax), peaked (synthetic, SmolLM2's mean entropy) or "
                        "smollm2 (the real SmolLM2 head on text; its shape only). See benchmarks/inputs.py")
    p.add_argument("--out", default=None,
                   help=f"results folder (default: a fresh {FRESH}/<tag>_<time>; make bench: benchmarks/results)")
    p.add_argument("--tag", default=None, help="results file stem (default: cpu, or the GPU's name)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--quiet", action="store_true", help="print only the final table")
    return p


def config_from_args(a) -> tuple[harness.Config, str]:
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    dtype = ops.DTYPES[a.dtype or ("bf16" if device == "cuda" else "fp32")]
    modes = _csv(a.modes) if a.modes else (list(ops.MODES) if device == "cuda" else ["fwd", "fwd+bwd"])
    for name, values, known in (("--ops", _csv(a.ops), ops.OPS), ("--modes", modes, ops.MODES)):
        bad = [v for v in values if v not in known]
        if bad:
            raise SystemExit(f"{name}: unknown {bad}; known: {', '.join(known)}")
    shapes = [registry.parse_shape(s) for s in a.shape]
    for c in a.case:
        model, _, n = c.partition(":")
        shapes += registry.model_shapes([model], [int(n)])
    if a.models:
        shapes += registry.model_shapes(_csv(a.models), [int(x) for x in _csv(a.tokens)])
    if not shapes:
        shapes = registry.table_shapes(registry.GPU_TABLE if device == "cuda" else registry.CPU_TABLE)
    cfg = harness.Config(
        ops=_csv(a.ops), shapes=shapes, providers=_csv(a.providers), modes=modes, dtype=dtype,
        device=device, seq_len=a.seq_len, seed=a.seed, inputs=a.inputs, check_rows=a.check_rows,
        check_compiled=a.check_compiled,
        mem=a.mem, compile_timeout=a.compile_timeout or (300.0 if device == "cpu" else 240.0),
        cpu_budget_s=a.cpu_budget, min_reps=a.min_reps, budget_s=a.budget, verbose=not a.quiet)
    tag = a.tag
    if tag is None:
        tag = "cpu" if device == "cpu" else torch.cuda.get_device_name(0).split()[-1].lower().replace("/", "-")
    return cfg, tag


def fresh_out(tag: str) -> str:
    """runs/bench/<tag>_<YYYYmmdd_HHMMSS>, with a suffix when that folder already exists."""
    base = os.path.join(FRESH, f"{tag}_{time.strftime('%Y%m%d_%H%M%S')}")
    path, k = base, 1
    while os.path.exists(path):
        path, k = f"{base}_{k}", k + 1
    os.makedirs(path)
    return path


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    if not faulthandler.is_enabled():
        try:
            faulthandler.enable()  # a provider that crashes the interpreter leaves a traceback in the log
        except (ValueError, OSError):  # no real stderr (e.g. captured under pytest)
            pass
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        cfg, tag = config_from_args(a)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if a.out is None:
        a.out = fresh_out(tag)
    t0 = time.time()
    meta = report.machine_info(cfg.device)
    def save_partial(rows):  # a run killed later still leaves what it measured
        report.write(rows, dict(meta, partial=True), a.out, tag, plot=False)

    rows = harness.run(cfg, on_progress=save_partial)
    meta["wall_s"] = round(time.time() - t0, 1)
    meta["loadavg_end"] = report._loadavg()  # other work on the machine inflates CPU times: check both load figures
    meta["command"] = " ".join(["python -m benchmarks", *(argv if argv is not None else sys.argv[1:])])
    paths = report.write(rows, meta, a.out, tag, plot=not a.no_plot)
    print(f"\n# {report.machine_line(meta)}")
    print(report.format_table(rows))
    print("\nwrote " + ", ".join(paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
