"""Roofline model of the dph Triton kernels on an H200, next to the GEMM floors (no GPU needed).

    python -m benchmarks.roofline [--results benchmarks/results/gpu_logprob.json ...]

For each kernel and shape: FLOPs, HBM bytes, L2 traffic (tile loads), fp32 atomic bytes, and a predicted time
max(FLOPs / 790 TFLOP/s, HBM / 4.8 TB/s, atomics / ATOMIC_TBS): a roofline, so the slowest resource bounds it.
The floors are 3 and 4 GEMMs of 2 N D V FLOPs at the same 790 TFLOP/s (80% of the 989 TFLOP/s dense bf16 peak):
3 = logits, dh, dW with the logits kept; 4 = with the logits recomputed in backward, as every fused kernel here
does. With measured results (a harness JSON from gpu_check) the measured dph-triton ms is printed beside the model.

The model and what it says about the designs (all predictions; no GPU time has been measured for this project):
* GEMM work. linear_logprob fwd is 1 GEMM, fwd+bwd 4 (the backward recomputes the logits). The fused loss is the
  same 4 plus O(N) elementwise work. The exact JS divergence (reference head without gradient) is 2 GEMMs per logit
  pass over both heads: forward 2 passes (log-sum-exps, then D and C) = 4, backward recompute 2 + dh + dW = 4, so 8.
* HBM. W (V x D bf16) is read once per pass from HBM when the row blocks that share a vocab tile run together
  (the grouped program order of the backward); h is small. At llama3-8b HBM time is ~0.2 ms per pass: never the
  bound.
* Atomics. The backward adds each (BLOCK_N x BLOCK_V) tile's products into fp32 dh and dW with atomics:
  dh gets N D 4 bytes per vocab block (V / BLOCK_V times) and dW gets V D 4 bytes per row block (N / BLOCK_N
  times). At llama3-8b (N=8192, BLOCK_N=64, BLOCK_V=128) that is 134 GB into dh and 269 GB into dW, ~100x the HBM
  traffic of the GEMM operands. Red operations resolve in L2; their throughput on Hopper is not published, so
  ATOMIC_TBS is an assumption (default 3 TB/s, about half the L2 bandwidth) and the table shows the time at it.
  Under that assumption the atomic scatter, not the tensor cores, bounds the backward (134.5 ms predicted for
  linear_logprob fwd+bwd vs a 43.5 ms 4-GEMM floor), and no tile choice fixes it: bigger BLOCK_V cuts dh traffic and raises registers (the AOT table
  shows BLOCK_V=128 already at 240-255 registers).
* The alternative this points to (design "chunked-cublas" in the table): backward over row chunks of C tokens that
  writes the bf16 dlogit chunk [C, V] to HBM and hands dh = dlogit @ W and dW += dlogit.T @ h to cuBLAS. Extra HBM
  traffic: the chunk written once and read twice, 3 x 2 N V bytes in all (6.3 GB at llama3-8b, ~1.3 ms), no
  atomics, memory C V 2 bytes (C = 4096: 1 GiB at V=128256). Predicted fwd+bwd at the 4-GEMM floor (its 10.7 GB
  of HBM traffic, 2.2 ms, hides under the GEMMs in this max-of-terms model).
  This is the restructuring the issue allows ("move one of them to a cuBLAS matmul over a bounded chunk"); it is
  not built yet: the prediction has to be checked against a measured atomic throughput first (gpu_check's
  logprob section measures the current backward).
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass

PEAK_TFLOPS = 989.0  # H200 dense bf16
PRACTICAL = 0.8  # fraction of peak a large GEMM reaches
HBM_TBS = 4.8
ATOMIC_TBS = 3.0  # assumption (see the module docstring)
SHAPES = {"llama3-8b": (8192, 4096, 128256), "gemma2-2b": (8192, 2304, 256000)}


@dataclass
class Estimate:
    kernel: str
    design: str
    flops: float
    hbm_bytes: float
    l2_bytes: float
    atomic_bytes: float

    def ms(self, atomic_tbs=ATOMIC_TBS):
        terms = (self.flops / (PEAK_TFLOPS * PRACTICAL * 1e12), self.hbm_bytes / (HBM_TBS * 1e12),
                 self.atomic_bytes / (atomic_tbs * 1e12) if self.atomic_bytes else 0.0)
        return 1e3 * max(terms)

    def bound(self, atomic_tbs=ATOMIC_TBS):
        terms = {"tensor": self.flops / (PEAK_TFLOPS * PRACTICAL), "hbm": self.hbm_bytes / HBM_TBS,
                 "atomics": self.atomic_bytes / atomic_tbs}
        return max(terms, key=terms.get)


def gemm_ms(N, D, V, n_gemms):
    return 1e3 * n_gemms * 2.0 * N * D * V / (PEAK_TFLOPS * PRACTICAL * 1e12)


def _configs():
    from dph_kernels.linear_logprob_triton import GPU_CONFIGS
    return GPU_CONFIGS


def estimates(N, D, V, itemsize=2):
    """Estimates for the kernels the issue names, at the bf16 GPU configs the launchers use."""
    cfg = _configs()
    w, h = V * D * itemsize, N * D * itemsize
    gemm = 2.0 * N * D * V
    bn_f, bv_f = cfg[("logprob_fwd", "bf16")][:2]
    bn_b, bv_b = cfg[("logprob_bwd", "bf16")][:2]
    bn_d, bv_d = cfg[("div_bwd", "bf16")][:2]

    def l2(bn, bv, passes=1):  # tile loads: W once per row block, h once per vocab block
        return passes * (N / bn * w + V / bv * h)

    def atomics(bn, bv):  # fp32 dh per vocab block + fp32 dW per row block
        return 4.0 * (V / bv * N * D + N / bn * V * D)

    out = []
    fwd = Estimate("linear_logprob", "fwd", gemm, w + h, l2(bn_f, bv_f), 0.0)
    bwd = Estimate("linear_logprob", "bwd", 3 * gemm, w + 2 * h + 4 * V * D + 4 * N * D, l2(bn_b, bv_b, 3),
                   atomics(bn_b, bv_b))
    both = Estimate("linear_logprob", "fwd+bwd atomics", 4 * gemm, fwd.hbm_bytes + bwd.hbm_bytes,
                    fwd.l2_bytes + bwd.l2_bytes, bwd.atomic_bytes)
    chunk = Estimate("linear_logprob", "fwd+bwd chunked-cublas", 4 * gemm,
                     fwd.hbm_bytes + 3 * w + 2 * h + 3 * 2.0 * N * V, fwd.l2_bytes + l2(bn_b, bv_b), 0.0)
    out += [fwd, both, chunk]
    out.append(Estimate("fused loss", "fwd+bwd atomics", 4 * gemm, both.hbm_bytes + 40 * N, both.l2_bytes,
                        both.atomic_bytes))
    out.append(Estimate("fused loss", "fwd+bwd chunked-cublas", 4 * gemm, chunk.hbm_bytes + 40 * N, chunk.l2_bytes,
                        0.0))
    js_fwd = Estimate("js divergence", "fwd", 4 * gemm, 2 * (2 * w + 2 * h), 4 * l2(bn_d, bv_d), 0.0)
    out.append(js_fwd)
    out.append(Estimate("js divergence", "fwd+bwd atomics", 8 * gemm, js_fwd.hbm_bytes + 2 * w + 2 * h + 4 * V * D,
                        js_fwd.l2_bytes + 4 * l2(bn_d, bv_d), atomics(bn_d, bv_d)))
    return out


def measured(paths):
    """{(model, N, op, mode): ms} of dph-triton rows in harness JSONs."""
    found = {}
    for p in paths:
        if not os.path.exists(p):
            continue
        with open(p) as f:
            for r in json.load(f).get("rows", []):
                if r.get("provider") == "dph-triton" and r.get("status") == "ok":
                    found[(r["model"], r["N"], r["op"], r["mode"])] = r.get("ms")
    return found


_OPS = {"linear_logprob": "logprob", "fused loss": "dph-js", "js divergence": "fdiv-js"}


def table(atomic_tbs=ATOMIC_TBS, results=()):
    meas = measured(results)
    lines = [f"H200 model: {PEAK_TFLOPS:.0f} TFLOP/s bf16 x {PRACTICAL:.0%}, HBM {HBM_TBS} TB/s, fp32 atomics "
             f"{atomic_tbs} TB/s (assumed). Predictions, not measurements.",
             f"{'shape':10s} {'kernel':15s} {'design':24s} {'TFLOP':>7s} {'HBM GB':>7s} {'L2 GB':>7s} "
             f"{'atom GB':>8s} {'pred ms':>8s} {'bound':>8s} {'3-GEMM':>7s} {'4-GEMM':>7s} {'measured':>9s}"]
    for model, (N, D, V) in SHAPES.items():
        f3, f4 = gemm_ms(N, D, V, 3), gemm_ms(N, D, V, 4)
        for e in estimates(N, D, V):
            mode = "fwd" if e.design == "fwd" else "fwd+bwd"
            m = meas.get((model, N, _OPS[e.kernel], mode)) if "chunked" not in e.design else None
            lines.append(f"{model:10s} {e.kernel:15s} {e.design:24s} {e.flops / 1e12:7.1f} {e.hbm_bytes / 1e9:7.2f} "
                         f"{e.l2_bytes / 1e9:7.1f} {e.atomic_bytes / 1e9:8.1f} {e.ms(atomic_tbs):8.2f} "
                         f"{e.bound(atomic_tbs):>8s} {f3:7.2f} {f4:7.2f} "
                         f"{'%9.2f' % m if m else '        -'}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--atomic-tbs", type=float, default=ATOMIC_TBS, help="assumed fp32 atomic throughput, TB/s")
    ap.add_argument("--results", nargs="*", default=[], help="harness JSONs with measured dph-triton rows")
    a = ap.parse_args(argv)
    print(table(a.atomic_tbs, a.results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
