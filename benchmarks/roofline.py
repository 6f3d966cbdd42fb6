"""Roofline model of the dph Triton kernels on an H200, next to the GEMM floors (no GPU needed).

    python -m benchmarks.roofline [--results benchmarks/results/gpu_logprob.json ...] [--atomic-tbs 3]

Each design is a list of kernel launches; a launch takes max(FLOPs / 790 TFLOP/s, HBM bytes / 4.8 TB/s, atomic bytes /
ATOMIC_TBS) plus LAUNCH_US, and a design takes the sum over its launches (kernels run one after another, so one
kernel's HBM time does not hide under another's tensor-core time). The floors are 3 and 4 GEMMs of 2 N D V FLOPs at
the same 790 TFLOP/s (80% of the 989 TFLOP/s dense bf16 peak): 3 = logits, dh, dW with the logits kept; 4 = with the
logits recomputed in backward, as every fused kernel here does. With measured results (a harness JSON from gpu_check)
the measured dph-triton ms is printed beside the model. All numbers are predictions; no GPU time has been measured.

The two backward designs:
* "atomics" (the earlier default, removed): one Triton program per (BLOCK_N x BLOCK_V) tile recomputed the logits
  and added dlogit @ W into fp32 dh and dlogit.T @ h into fp32 dW with atomics: dh received N D 4 bytes per vocab
  block and dW V D 4 bytes per row block, 134 GB + 269 GB at llama3-8b N=8192. Red operations resolve in L2 at an
  unpublished rate (ATOMIC_TBS, assumed 3 TB/s), which made the atomics, not the tensor cores, the bound: 134.5 ms
  predicted vs the 43.5 ms floor. Gradients were also not bitwise repeatable (fp32 addition order) and it held a
  full fp32 dW plus its bf16 copy.
* "vocab-chunks" (the default, linear_logprob_triton.head_grads): per vocabulary chunk of C columns one Triton
  kernel recomputes the chunk's logits for all rows and writes its dlogits once ([N, C] in the operand dtype), then
  cuBLAS computes dW[chunk] = dz.T @ h (written once, in the weight's dtype) and dh += dz @ W[chunk] (fp32). The
  chunk buffer is written once and read twice (6 N V bytes over all chunks at bf16, 6.3 GB at llama3-8b, ~1.3 ms
  of HBM time spread over GEMMs that are compute-bound); h is re-read and the fp32 dh read and written once per
  chunk. Predicted within a few percent of the 4-GEMM floor (the table's ratio column).
Why chunk over the vocabulary rather than the rows: a row chunk's dW contribution has to be accumulated over all
row chunks (V D fp32 traffic per chunk and a full fp32 dW), while a vocabulary chunk owns its dW rows outright and
only dh (N D, small) is accumulated. Keeping the logits from the forward would save the recompute GEMM but needs
N V 2 bytes (2.1 GB at llama3-8b) alive between forward and backward.

Peak extra memory of the default backward (bf16 h and W, N rows with a loss, chunk C = DLOGIT_CHUNK_BYTES / (2 N)):
    size(dW in W's dtype) + N C 2 (the dlogit chunk, <= 192 MiB) + 2 N D 4 (fp32 dh and one fp32 partial product)
    [+ N D 2 when rows were compacted: the gathered hidden states]
At llama3-8b N=8192: size(dW) + 192 + 256 MiB = size(dW) + 448 MiB (the table's memory column).
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field

PEAK_TFLOPS = 989.0  # H200 dense bf16
PRACTICAL = 0.8  # fraction of peak a large GEMM reaches
HBM_TBS = 4.8
ATOMIC_TBS = 3.0  # assumption (see the module docstring)
LAUNCH_US = 5.0  # per kernel launch, including its tail wave
SHAPES = {"llama3-8b": (8192, 4096, 128256), "gemma2-2b": (8192, 2304, 256000)}
MiB = 2**20


@dataclass
class Launch:
    flops: float = 0.0
    hbm: float = 0.0
    atomics: float = 0.0

    def ms(self, atomic_tbs=ATOMIC_TBS):
        return 1e3 * max(self.flops / (PEAK_TFLOPS * PRACTICAL * 1e12), self.hbm / (HBM_TBS * 1e12),
                         self.atomics / (atomic_tbs * 1e12)) + LAUNCH_US * 1e-3

    def bound(self, atomic_tbs=ATOMIC_TBS):
        terms = {"tensor": self.flops / (PEAK_TFLOPS * PRACTICAL), "hbm": self.hbm / HBM_TBS,
                 "atomics": self.atomics / atomic_tbs}
        return max(terms, key=terms.get)


@dataclass
class Estimate:
    kernel: str
    design: str
    launches: list = field(default_factory=list)
    n_gemms: int = 4  # the floor it is compared with
    extra_bytes: float = 0.0  # peak extra memory of its backward (0: forward only)

    @property
    def flops(self):
        return sum(x.flops for x in self.launches)

    @property
    def hbm_bytes(self):
        return sum(x.hbm for x in self.launches)

    @property
    def atomic_bytes(self):
        return sum(x.atomics for x in self.launches)

    def ms(self, atomic_tbs=ATOMIC_TBS):
        return sum(x.ms(atomic_tbs) for x in self.launches)

    def bound(self, atomic_tbs=ATOMIC_TBS):
        per = {}
        for x in self.launches:
            per[x.bound(atomic_tbs)] = per.get(x.bound(atomic_tbs), 0.0) + x.ms(atomic_tbs)
        return max(per, key=per.get)


def gemm_ms(N, D, V, n_gemms):
    return 1e3 * n_gemms * 2.0 * N * D * V / (PEAK_TFLOPS * PRACTICAL * 1e12)


def _configs():
    from dph_kernels.linear_logprob_triton import GPU_CONFIGS
    return GPU_CONFIGS


def chunk_cols(N, V, s, n_heads=1):
    from dph_kernels.linear_logprob_triton import chunk_width
    return chunk_width(N, V, s, n_heads)


def _chunked_backward(N, D, V, s, heads=1):
    """Launches of the vocab-chunk backward for `heads` heads of width D (the divergence: 2 recomputed, 1 graded)
    and its peak extra memory."""
    C = chunk_cols(N, V, s)
    launches = []
    for v0 in range(0, V, C):
        c = min(C, V - v0)
        gemm = 2.0 * N * D * c
        # dlogit kernel: recompute `heads` logit tiles (W chunk and h read per head), write the dlogit chunk once
        launches.append(Launch(heads * gemm, heads * (c * D * s + N * D * s) + N * c * s))
        launches.append(Launch(gemm, N * c * s + N * D * s + c * D * s))  # dW[chunk] = dz.T @ h, written once
        # dh += dz @ W[chunk]: an fp32 product, then read-add-write of the fp32 accumulator
        launches.append(Launch(gemm, N * c * s + c * D * s + N * D * 4))
        launches.append(Launch(0.0, 3 * N * D * 4))
    extra = V * D * s + N * C * s + 2 * N * D * 4
    return launches, extra


def estimates(N, D, V, s=2):
    """Per kernel: the forward, the earlier atomic backward and the vocab-chunk default (bf16: s = 2 bytes)."""
    cfg = _configs()
    gemm = 2.0 * N * D * V
    w, h = V * D * s, N * D * s
    bn_b, bv_b = cfg[("logprob_bwd", "bf16")][:2]
    bn_d, bv_d = cfg[("div_bwd", "bf16")][:2]

    def atomics(bn, bv):  # fp32 dh per vocab block + fp32 dW per row block
        return 4.0 * (V / bv * N * D + N / bn * V * D)

    fwd = Launch(gemm, w + h)
    atomic_bwd = [Launch(3 * gemm, w + 2 * h, atomics(bn_b, bv_b)), Launch(0.0, 4 * V * D + s * V * D)]
    atomic_extra = V * D * 4 + V * D * s + N * D * 4 + N * D * s
    chunked, chunked_extra = _chunked_backward(N, D, V, s)
    out = [Estimate("linear_logprob", "fwd", [fwd], 1),
           Estimate("linear_logprob", "fwd+bwd atomics (old)", [fwd, *atomic_bwd], 4, atomic_extra),
           Estimate("linear_logprob", "fwd+bwd vocab-chunks", [fwd, *chunked], 4, chunked_extra)]
    token = Launch(0.0, 40 * N)  # the per-token loss pass: O(N)
    out.append(Estimate("fused loss", "fwd+bwd atomics (old)", [fwd, token, *atomic_bwd], 4, atomic_extra))
    out.append(Estimate("fused loss", "fwd+bwd vocab-chunks", [fwd, token, *chunked], 4, chunked_extra))
    # JS: forward = two passes over both heads (log-sum-exps, then D and C): 4 GEMMs; backward recomputes both heads
    # and grades the policy head: 2 + 2 GEMMs.
    js_fwd = [Launch(2 * gemm, 2 * (w + h)), Launch(2 * gemm, 2 * (w + h))]
    js_atomic = [Launch(4 * gemm, 2 * (w + h) + 4 * V * D, atomics(bn_d, bv_d)), Launch(0.0, 4 * V * D + s * V * D)]
    js_chunked, js_extra = _chunked_backward(N, D, V, s, heads=2)
    out.append(Estimate("js divergence", "fwd", js_fwd, 4))
    out.append(Estimate("js divergence", "fwd+bwd atomics (old)", [*js_fwd, *js_atomic], 8, atomic_extra))
    out.append(Estimate("js divergence", "fwd+bwd vocab-chunks", [*js_fwd, *js_chunked], 8, js_extra))
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
             f"{atomic_tbs} TB/s (assumed), {LAUNCH_US:.0f} us per launch. Predictions, not measurements.",
             f"{'shape':10s} {'kernel':15s} {'design':22s} {'TFLOP':>6s} {'HBM GB':>7s} {'atom GB':>8s} "
             f"{'pred ms':>8s} {'bound':>8s} {'floor':>14s} {'x floor':>7s} {'bwd extra':>14s} {'measured':>9s}"]
    for model, (N, D, V) in SHAPES.items():
        for e in estimates(N, D, V):
            mode = "fwd" if e.design == "fwd" else "fwd+bwd"
            floor = gemm_ms(N, D, V, e.n_gemms)
            m = meas.get((model, N, _OPS[e.kernel], mode)) if "old" not in e.design else None
            extra = f"dW+{(e.extra_bytes - V * D * 2) / MiB:.0f} MiB" if e.extra_bytes else "-"
            lines.append(f"{model:10s} {e.kernel:15s} {e.design:22s} {e.flops / 1e12:6.1f} {e.hbm_bytes / 1e9:7.2f} "
                         f"{e.atomic_bytes / 1e9:8.1f} {e.ms(atomic_tbs):8.2f} {e.bound(atomic_tbs):>8s} "
                         f"{e.n_gemms:d}-GEMM {floor:6.2f} {e.ms(atomic_tbs) / floor:7.3f} {extra:>14s} "
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
