"""One command for a GPU session (<= 10 minutes on one H100 or H200): the GPU correctness tests, the default
backward's repeatability and memory, the masked-row speedup, then the kernel benchmarks against the baselines. Full
logs go to OUT_DIR; a short table is printed last.

    python benchmarks/gpu_check.py OUT_DIR [--wheels DIR] [--budget 570] [--only tests,logprob,...]

Before the session (the GPU machine has no network), fetch the pure-Python baselines as wheels into an ignored
folder and carry it along:

    .venv/bin/pip download --no-deps -d benchmarks/wheels liger-kernel==0.8.5 cut-cross-entropy==25.1.1
    # (add pytest / pluggy / iniconfig wheels too if the GPU image has no pytest)
    python benchmarks/gpu_check.py "$OUT" --wheels benchmarks/wheels

Sections (each a subprocess with its own time limit, so one failure or hang never stops the others):
    tests    pytest -m gpu (the kernel tests on CUDA, the two-backward bitwise check among them)
    vp       the vocab-parallel kernels (process_group=) on every GPU of the machine over NCCL, TP = the GPU count
    bwd      benchmarks.bwd_check: llama3-8b and gemma2-2b N=8192 bf16, two backward calls bitwise equal, and the
             backward's peak extra memory beside its formula (size(dW) + N C 2 + 2 N D 4)
    masked   benchmarks.masked_rows: fwd+bwd with half the positions masked vs none (fused loss, linear_logprob),
             llama3-8b B x T = 8 x 1024 bf16
    logprob  linear_logprob, llama3-8b and gemma2-2b N=8192, bf16, fwd and fwd+bwd: dph-triton (vocab-chunk
             backward), eager, torch.compile, Liger, CCE, dph-torch (the torch path on CUDA); random inputs
    peaked   the same, fwd+bwd, with --inputs peaked (synthetic inputs at SmolLM2's mean entropy, 3.73 nats:
             benchmarks/inputs.py), where CCE's tile filtering can skip work
    fused    fused DPH loss (grpo, dph-js presets), B=8 T=1024 llama3-8b bf16, fwd+bwd, vs eager/compile/Liger GRPO
    fdiv     linear_f_divergence js and fkl, llama3-8b N=8192 bf16, fwd+bwd, vs eager/compile/Liger JSD
    aot      python -m benchmarks.aot: the compile table (registers, spills, smem, MMA, atomics) for sm_90
    roofline python -m benchmarks.roofline: the H200 model, next to this run's measured dph-triton times
The earlier atomic backward is not among them: it was removed (its model stays in the roofline table).
This script imports nothing but the standard library, so it reports even when torch or the package does not import.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name, seconds, command (after `python -m`), results tag. Providers are listed with the ones an issue requires
# first, so that a section cut short by its time budget loses the optional ones.
_BENCH = ["benchmarks", "--device", "cuda", "--dtype", "bf16", "--compile-timeout", "75"]
_LOGPROB = ["--ops", "logprob", "--providers", "dph-triton,eager,compile,liger,cce,dph-torch",
            "--case", "llama3-8b:8192", "--case", "gemma2-2b:8192"]
SECTIONS = [
    ("tests", 100, ["pytest", "tests", "-m", "gpu", "-q", "-rfE", "-o", "addopts=", "-p", "no:cacheprovider"], None),
    ("vp", 45, ["torch.distributed.run", "--nproc-per-node=gpu", "tests/vp_worker.py", "{out}/vp.json"], None),
    ("bwd", 45, ["benchmarks.bwd_check", "--json", "{out}/bwd.json"], None),
    ("masked", 40, ["benchmarks.masked_rows", "--model", "llama3-8b", "--batch", "8", "--seq", "1024", "--dtype",
                    "bf16", "--reps", "5", "--json", "{out}/masked.json"], None),
    ("logprob", 120, _BENCH + _LOGPROB + ["--modes", "fwd,fwd+bwd"], "gpu_logprob"),
    ("peaked", 70, _BENCH + _LOGPROB + ["--modes", "fwd+bwd", "--inputs", "peaked"], "gpu_logprob_peaked"),
    ("fused", 70, _BENCH + ["--ops", "grpo,dph-js", "--modes", "fwd+bwd", "--seq-len", "1024",
                            "--providers", "dph-triton,eager,liger,compile,dph-torch",
                            "--case", "llama3-8b:8192"], "gpu_fused"),
    ("fdiv", 60, _BENCH + ["--ops", "fdiv-js,fdiv-fkl", "--modes", "fwd+bwd",
                           "--providers", "dph-triton,eager,liger,compile,dph-torch",
                           "--case", "llama3-8b:8192"], "gpu_fdiv"),
    # No GPU needed for these two; last, so a short budget drops them first.
    ("aot", 30, ["benchmarks.aot", "--arch", "sm_90", "--dtype", "bf16,fp32"], None),
    ("roofline", 10, ["benchmarks.roofline", "--results"], None),
]
RESERVE_S = 10  # kept back for the final table


def sh(cmd, log_path, timeout, env):
    """Run `cmd`, tee-free: everything to log_path. Returns (rc, seconds, timed_out)."""
    t0 = time.time()
    with open(log_path, "w") as log:
        log.write(f"$ {' '.join(shlex.quote(c) for c in cmd)}\n")
        log.flush()
        try:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=max(1, timeout))
                return rc, time.time() - t0, False
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)  # the whole group: pytest / inductor workers too
                proc.wait()
                log.write(f"\n[gpu_check] killed after {timeout:.0f} s (section time limit)\n")
                return 124, time.time() - t0, True
        except OSError as e:
            log.write(f"[gpu_check] could not start: {e}\n")
            return 127, time.time() - t0, False


def install_wheels(wheels, site, log_path, env):
    files = sorted(glob.glob(os.path.join(wheels, "*.whl")))
    if not files:
        return f"no *.whl in {wheels}"
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--disable-pip-version-check",
           "--target", site, *files]
    rc, _, _ = sh(cmd, log_path, 120, env)
    return None if rc == 0 else f"pip install failed (rc={rc}), see {log_path}"


def tail(path, n=3):
    try:
        with open(path) as f:
            return [ln.rstrip() for ln in f.readlines()[-n:]]
    except OSError:
        return []


def short_table(out_dir, tags):
    lines = []
    hdr = f"{'op':9s} {'shape':20s} {'mode':8s} {'provider':11s} {'ms':>9s} {'MiB':>9s} {'x best':>7s} goals"
    for tag in tags:
        path = os.path.join(out_dir, "results", f"{tag}.json")
        if not os.path.exists(path):
            lines.append(f"{tag}: no results")
            continue
        with open(path) as f:
            rows = json.load(f)["rows"]
        lines.append(hdr)
        for r in rows:
            shape = f"{r['model'] if r['model'] != 'custom' else 'D%d,V%d' % (r['D'], r['V'])} N={r['N']}"
            if r["status"] == "skip":
                continue
            if r["status"] != "ok":
                lines.append(f"{r['op']:9s} {shape:20s} {r['mode']:8s} {r['provider']:11s} "
                             f"{r['status']}: {r.get('reason', '')[:60]}")
                continue
            goals = ""
            if r["provider"] == "dph-triton" and r.get("ratio") is not None:
                goals = "time " + ("ok" if r["ratio"] <= 0.8 else "MISS")
                if r.get("mem_mb") is not None and "bwd" in r["mode"]:
                    goals += ", mem " + ("ok" if r["mem_mb"] <= r["dw_mb"] + 64 else "MISS")
            lines.append(f"{r['op']:9s} {shape:20s} {r['mode']:8s} {r['provider']:11s} {r.get('ms', 0):9.2f} "
                         f"{r.get('mem_mb') or 0:9.0f} {r.get('ratio') or 0:7.2f} {goals}")
        lines.append("")
    return lines


def vp_summary(path):
    """One line from tests/vp_worker.py's report: world size, cases within the numerics contract, the worst."""
    try:
        with open(path) as f:
            rep = json.load(f)
    except (OSError, ValueError) as e:
        return f"no report ({type(e).__name__})"
    ok, worst = 0, (0.0, "")
    cases = {k: v for k, v in rep["cases"].items() if "quantities" in v}
    for name, c in cases.items():
        ratios = [q["kernel_err"] / q["bound"] for q in c["quantities"].values()]
        ok += all(r <= 1 for r in ratios) and c["replicated"] and c["padding_grad_zero"]
        worst = max(worst, (max(ratios), name))
    return f"TP={rep['world']}: {ok}/{len(cases)} cases within the contract (worst error/bound {worst[0]:.2f}, {worst[1]})"


def _smoke(cmd):
    """The same section on the CPU at a tiny shape."""
    if cmd[0] == "torch.distributed.run":  # vp: two CPU processes over gloo
        return [c.replace("--nproc-per-node=gpu", "--nproc-per-node=2") for c in cmd]
    if cmd[0] == "benchmarks.bwd_check":
        return cmd + ["--cpu-smoke"]
    if cmd[0] == "benchmarks.masked_rows":
        return [cmd[0], "--device", "cpu", "--batch", "2", "--seq", "64", "--reps", "1", *cmd[-2:]]
    if cmd[0] != "benchmarks":
        return cmd
    out, skip = [], False
    for i, c in enumerate(cmd):
        if skip:
            skip = False
            continue
        if c in ("--case", "--device", "--dtype", "--compile-timeout"):
            skip = True
            continue
        out.append(c)
    return out + ["--device", "cpu", "--dtype", "fp32", "--shape", "512,64,1024", "--seq-len", "128",
                  "--mem", "inproc", "--no-plot"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", help="folder for logs and results (created)")
    ap.add_argument("--wheels", default=None, help="folder of wheels to install (--no-deps, --no-index) first")
    ap.add_argument("--budget", type=float, default=570, help="seconds for the whole check (default %(default)s)")
    ap.add_argument("--only", default=None, help="comma list of sections: " + ",".join(s[0] for s in SECTIONS))
    ap.add_argument("--pytest-args", default="", help="extra pytest arguments for the tests section")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="rehearse on a CPU machine: tiny fp32 shapes on the CPU (checks this script, not the GPU)")
    a = ap.parse_args(argv)

    t_start = time.time()
    out_dir = os.path.abspath(a.out_dir)
    os.makedirs(out_dir, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", DPH_GPU_CHECK="1")
    env.pop("TRITON_INTERPRET", None)
    env["DPH_VP_DEVICE"] = "cpu" if a.cpu_smoke else "cuda"
    summary = []

    if a.wheels:
        site = os.path.join("/tmp", f"dph_gpu_site_{os.getpid()}")
        why = install_wheels(a.wheels, site, os.path.join(out_dir, "wheels.log"), env)
        if why:
            summary.append(f"wheels: {why}")
        else:
            env["PYTHONPATH"] = os.pathsep.join([site, ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
            summary.append(f"wheels: installed {len(glob.glob(os.path.join(a.wheels, '*.whl')))} from {a.wheels}")
    else:
        env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)

    probe = ("import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', "
             "torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '');\n"
             "for m in ['triton', 'dph_kernels', 'liger_kernel', 'cut_cross_entropy', 'pytest', 'matplotlib']:\n"
             "    try:\n        mod = __import__(m); print(m, getattr(mod, '__version__', 'ok'))\n"
             "    except Exception as e:\n        print(m, 'MISSING', type(e).__name__, e)\n")
    sh([sys.executable, "-c", probe], os.path.join(out_dir, "env.log"), 60, env)
    sh(["nvidia-smi"], os.path.join(out_dir, "nvidia-smi.log"), 20, env)
    summary += ["env: " + "; ".join(tail(os.path.join(out_dir, "env.log"), 7))]

    only = set(a.only.split(",")) if a.only else None
    tags = []
    for name, seconds, cmd, tag in SECTIONS:
        if only and name not in only:
            continue
        left = a.budget - (time.time() - t_start) - RESERVE_S
        if left < 20:
            summary.append(f"{name}: not run (total budget spent)")
            continue
        limit = min(seconds, left)
        if a.cpu_smoke:
            cmd = _smoke(cmd)
        full = [sys.executable, "-m", *(c.replace("{out}", out_dir) for c in cmd)]
        if name == "tests" and a.pytest_args:
            full += shlex.split(a.pytest_args)
        if name == "roofline":  # the model next to what this run measured
            full += [os.path.join(out_dir, "results", f"{t}.json") for t in tags]
        if tag:
            # the harness stops starting measurements a little before the hard limit, so it still writes its files
            full += ["--out", os.path.join(out_dir, "results"), "--tag", tag, "--budget", str(max(10, limit - 25))]
            tags.append(tag)
        log_path = os.path.join(out_dir, f"{name}.log")
        rc, secs, killed = sh(full, log_path, limit, env)
        state = "killed at the time limit" if killed else f"rc={rc}"
        last = [ln for ln in tail(log_path, 40) if ln.strip()]
        if name == "tests":
            result = next((ln for ln in reversed(last) if " passed" in ln or " failed" in ln or "error" in ln
                           or "no tests ran" in ln), last[-1] if last else "")
            summary.append(f"tests: {state} in {secs:.0f} s: {result.strip()}")
        elif name == "vp":
            summary.append(f"vp: {state} in {secs:.0f} s: {vp_summary(os.path.join(out_dir, 'vp.json'))}")
        elif name in ("aot", "roofline", "bwd", "masked"):
            body = tail(log_path, 40 if name == "roofline" else 60)
            summary.append(f"{name}: {state} in {secs:.0f} s (log {log_path})")
            summary += [ln for ln in body if ln.strip() and not ln.startswith("  ")]
        else:
            summary.append(f"{name}: {state} in {secs:.0f} s (log {log_path})")

    print("\n".join(summary))
    print(f"total {time.time() - t_start:.0f} s; logs and results in {out_dir}\n")
    print("\n".join(short_table(out_dir, tags)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
