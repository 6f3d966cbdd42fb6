"""CPU benchmark of the chunked torch path vs the reference that materializes the logits.

    python -m benchmarks.cpu_linear_logprob [--shape N,D,V] [--repeats 3] [--entropy]     # dk.linear_logprob
    python -m benchmarks.cpu_linear_logprob --op fdiv --kind js --shape 2048,512,32768     # dk.linear_f_divergence

Forward + backward with a non-uniform upstream gradient per token. Each measurement runs in a fresh subprocess:
peak extra memory = the process's peak RSS during the call minus its RSS once the inputs exist; time = median of
repeats (after one warm-up) in a second subprocess.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def _rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _worker(impl, N, D, V, entropy, repeats, what, op="logprob", kind="js"):
    import torch
    import dph_kernels as dk

    torch.manual_seed(0)
    hidden = torch.randn(N, D).requires_grad_()
    weight = (torch.randn(V, D) / D**0.5).requires_grad_()
    targets = torch.randint(0, V, (N,))
    ref_hidden, ref_weight = torch.randn(N, D), torch.randn(V, D) / D**0.5
    upstream = torch.rand(N) + 0.5  # non-uniform per-token weights

    def step():
        if op == "fdiv":
            loss = (dk.linear_f_divergence(hidden, weight, ref_hidden, ref_weight, kind=kind, impl=impl)
                    * upstream).sum()
        else:
            out = dk.linear_logprob(hidden, weight, targets, return_entropy=entropy, impl=impl)
            loss = (out[0] * upstream).sum() + out[1].sum() if entropy else (out * upstream).sum()
        loss.backward()
        hidden.grad = weight.grad = None

    if what == "memory":
        base = max(_rss_mib(), _peak_rss_mib())
        step()
        return {"peak_extra_mib": _peak_rss_mib() - base}
    step()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "times_s": times}


def measure(impl, N, D, V, entropy=False, repeats=3, op="logprob", kind="js"):
    result = {"impl": impl}
    for what in ("memory", "time"):
        cmd = [sys.executable, "-m", "benchmarks.cpu_linear_logprob", "--worker", impl, "--what", what,
               "--shape", f"{N},{D},{V}", "--repeats", str(repeats), "--op", op, "--kind", kind] + (
               ["--entropy"] if entropy else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        result.update(json.loads(out.strip().splitlines()[-1]))
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="4096,512,32768", help="N,D,V")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--entropy", action="store_true", help="also return and backprop the entropy")
    p.add_argument("--op", choices=["logprob", "fdiv"], default="logprob")
    p.add_argument("--kind", default="js", help="divergence kind for --op fdiv")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--what", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    N, D, V = (int(x) for x in args.shape.split(","))
    if args.worker:
        print(json.dumps(_worker(args.worker, N, D, V, args.entropy, args.repeats, args.what, args.op, args.kind)))
        return
    import torch
    name = f"dk.linear_f_divergence(kind={args.kind!r})" if args.op == "fdiv" else "dk.linear_logprob"
    print(f"{name}, CPU fp32, N={N} D={D} V={V}, forward+backward, non-uniform upstream gradient"
          f"{' + entropy' if args.entropy else ''}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = [measure(impl, N, D, V, args.entropy, args.repeats, args.op, args.kind) for impl in ("reference", "torch")]
    ref = rows[0]
    logits_mib = N * V * 4 / 2**20
    print(f"(one fp32 [N, V] logits buffer = {logits_mib:.0f} MiB; dW = {V * D * 4 / 2**20:.0f} MiB)")
    print("| impl      | median time (s) | x reference | peak extra memory (MiB) | % of reference |")
    print("|-----------|-----------------|-------------|-------------------------|----------------|")
    for r in rows:
        print(f"| {r['impl']:<9} | {r['median_s']:15.3f} | {r['median_s'] / ref['median_s']:11.2f} "
              f"| {r['peak_extra_mib']:23.0f} | {100 * r['peak_extra_mib'] / ref['peak_extra_mib']:13.1f}% |")
    return rows


if __name__ == "__main__":
    main()
