"""The default Triton backward at the large shapes: bitwise repeatability and peak extra memory against its formula.

    python -m benchmarks.bwd_check [--cases llama3-8b:8192,gemma2-2b:8192] [--json out.json] [--cpu-smoke]

Per case (bf16, random inputs): dk.linear_logprob with the entropy on (a non-uniform upstream gradient on both) is
run forward + backward twice; "repeatable" says whether dh and dW came out bitwise equal (no atomics, fixed order).
The backward alone is measured for peak extra memory (torch.cuda.max_memory_allocated above what was allocated
before it, inputs and saved forward state excluded, the returned gradients included) and printed beside the model
(benchmarks/roofline.py): size(dW) + N C s + 2 N D 4, C = the chunk width linear_logprob_triton picks.
--cpu-smoke runs a tiny fp32 case under the Triton interpreter (checks this script, not the GPU).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

MiB = 2**20


def run_case(model, N, device, dtype_name):
    import torch

    import dph_kernels as dk
    from dph_kernels.linear_logprob_triton import chunk_width

    from .registry import MODELS, SOFTCAP
    D, V = MODELS[model][:2] if model in MODELS else (64, 1000)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, D, generator=g).to(device=device, dtype=dtype)
    weight = (torch.randn(V, D, generator=g) * 2.0 / D ** 0.5).to(device=device, dtype=dtype)
    targets = torch.randint(0, V, (N,), generator=g).to(device)
    up = [torch.randn(N, generator=g).to(device) for _ in range(2)]
    softcap = SOFTCAP.get(model)
    grads, peak = [], None
    for _ in range(2):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        logp, ent = dk.linear_logprob(h, w, targets, return_entropy=True, impl="triton", softcap=softcap)
        loss = (logp * up[0] + ent * up[1]).sum()
        if device == "cuda":
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - before
        grads.append((h.grad, w.grad))
        del h, w, logp, ent, loss
    repeatable = all(torch.equal(a, b) for a, b in zip(*grads))
    s = dtype.itemsize
    model_bytes = V * D * s + N * chunk_width(N, V, s) * s + 2 * N * D * 4
    return dict(model=model, N=N, D=D, V=V, dtype=dtype_name, softcap=softcap, repeatable=repeatable,
                peak_extra_mib=None if peak is None else peak / MiB, model_mib=model_bytes / MiB,
                dW_mib=V * D * s / MiB, limit_mib=V * D * s / MiB + 512)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="llama3-8b:8192,gemma2-2b:8192")
    ap.add_argument("--json", default=None)
    ap.add_argument("--cpu-smoke", action="store_true")
    a = ap.parse_args(argv)
    if a.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before dph_kernels' kernels are decorated
        cases, device, dtype = [("tiny", 70)], "cpu", "fp32"
    else:
        cases = [(c.split(":")[0], int(c.split(":")[1])) for c in a.cases.split(",")]
        device, dtype = "cuda", "bf16"
    rows = []
    print(f"{'case':18s} {'dtype':5s} {'repeatable':>10s} {'peak extra MiB':>14s} {'model MiB':>10s} "
          f"{'dW + 512 MiB':>12s}")
    for model, N in cases:
        try:
            r = run_case(model, N, device, dtype)
        except Exception as e:  # noqa: BLE001 - one failed case is a row, not a crash
            r = dict(model=model, N=N, error=f"{type(e).__name__}: {e}"[:300])
            print(f"{model}:{N}  error {r['error']}", flush=True)
            rows.append(r)
            continue
        rows.append(r)
        peak = "-" if r["peak_extra_mib"] is None else f"{r['peak_extra_mib']:.0f}"
        print(f"{model + ':' + str(N):18s} {dtype:5s} {str(r['repeatable']):>10s} {peak:>14s} "
              f"{r['model_mib']:10.0f} {r['limit_mib']:12.0f}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if all(r.get("repeatable") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
