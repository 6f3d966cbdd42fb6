"""CPU peak-memory worker: a fresh interpreter measures one provider on one shape (every op and mode asked for).
Each op is called once, unmeasured, first: neither compilation nor one-time library allocations are counted.

    python -m benchmarks.memworker '<json spec>'      (the harness starts it; one JSON line per result on stdout)

The parent sets MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ so that freed buffers go back to the OS and each
measurement starts from memory that is really in use.
"""
from __future__ import annotations

import json
import sys

import torch

from . import measure, ops, providers, registry


def main(argv=None):
    spec = json.loads((argv or sys.argv[1:])[0])
    model, N, D, V = spec["shape"]
    dtype = ops.DTYPES[spec["dtype"]]
    p = providers.all_providers()[spec["provider"]]
    for op in spec["ops"]:
        try:
            inp = ops.make_inputs(op, N, D, V, dtype, "cpu", seq_len=spec["seq_len"], seed=spec["seed"],
                                  softcap=registry.SOFTCAP.get(model), inputs=spec.get("inputs", "random"))
            fwd = p.make(op, inp, "cpu")
            # One untimed call first: compilation, and the libraries' one-time allocations (thread pools, BLAS
            # buffers), would otherwise be charged to whichever op a subprocess measures first.
            with measure.time_limit(spec["compile_timeout"]):
                measure.backward(inp, fwd())
            inp.zero_grad()
        except Exception as e:  # noqa: BLE001
            for mode in spec["modes"]:
                print(json.dumps(dict(op=op, mode=mode, error=f"{type(e).__name__}: {e}"[:300])), flush=True)
            continue
        for mode in spec["modes"]:
            try:
                mb = measure.peak_extra_mb(mode, fwd, inp, "cpu")
                print(json.dumps(dict(op=op, mode=mode, mem_mb=mb)), flush=True)
            except Exception as e:  # noqa: BLE001
                print(json.dumps(dict(op=op, mode=mode, error=f"{type(e).__name__}: {e}"[:300])), flush=True)
        del inp, fwd


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    main()
