"""Triton kernels for the fused linear log-prob (math in linear_logprob.py's docstring).

Forward: a program owns BLOCK_N rows and one vocab range; it streams BLOCK_V-wide logit tiles (each a tl.dot over
D blocks, fp32 accumulation), keeping per row an online max m, sum of exp s, sum of exp*z t (entropy) and the target
logit. Vocab ranges are merged in torch (O(N * splits) floats): splitting the vocab gives enough programs to fill the
GPU when N / BLOCK_N alone would not.

Backward, in vocabulary chunks of C columns (head_grads; the divergence's backward uses the same GEMM half):
  1. _dlogit_kernel: one program per (row block, column block) tile of the chunk recomputes the logits (tl.dot, fp32)
     and forms dz = d loss / d logit in fp32 registers (softmax gradient, entropy term, softcap slope, 1/T), then
     writes it once into an [N, C] buffer in the operands' dtype;
  2. cuBLAS: dW[chunk] = dz.T @ h (a GEMM over all rows, fp32 accumulation inside, stored once in the weight's dtype)
     and dh += dz @ W[chunk] (fp32 output into an fp32 [N, D] accumulator); db[chunk] = column sums of dz.
Why this design (benchmarks/roofline.py has the numbers): the earlier backward added each tile's products into fp32
dh and dW with atomics, ~400 GB of atomic traffic at llama3-8b N=8192 (dW is scattered once per row block), which
bounds it at ~3x the 4-GEMM floor; its gradients were not bitwise repeatable (fp32 addition order) and it held a full
fp32 dW. Chunking the vocabulary gives each chunk its own dW rows, written by one GEMM in a fixed order; only dh (N x
D, small) is accumulated over chunks, in a fixed order too, so two identical calls give bitwise-identical gradients.
The extra HBM traffic is the dz chunk written once and read twice (6 N V bytes in bf16 over the whole vocabulary,
~1.3 ms at llama3-8b against ~33 ms of backward GEMMs) plus h and the fp32 dh once per chunk: predicted at 1.03x the
4-GEMM floor. Row chunks would need every chunk's dW accumulated (V x D fp32 per chunk); keeping the forward's logits
would save the recompute GEMM but hold N V 2 bytes (2.1 GB at llama3-8b) from forward to backward. The atomic kernel
was removed: the model shows no regime where it wins (at small N its dW atomics alone, 4 V D bytes per row block,
exceed the chunked design's one bf16 write of dW). No CCE-style filtering of tiles with tiny softmax mass: it is an
approximation, and the contract asks for exact gradients (benchmarks/inputs.py measures how much it could skip).
C defaults to DLOGIT_CHUNK_BYTES / (N * itemsize) columns; the callers pass every row with a loss and no other
(LinearLogprobFunction compacts the rest away before the kernels).

Interpreter (TRITON_INTERPRET=1): bf16/fp16 tl.dot and arithmetic are wrong there, so UPCAST (on only in the
interpreter) casts loaded tiles to fp32 first. fp32 tiles multiply in full fp32 (DOT_PRECISION="ieee"): tl.dot would
use TF32 otherwise, which misses the fp32 numerics contract.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import interpreter_on


@triton.jit
def tanh(x):
    """tanh from exp (libdevice's is a stub in the interpreter): (1 - e) / (1 + e) with e = exp(-2|x|), and the odd
    Taylor series to x^7 below |x| = 0.125, where 1 - e would cancel (series error < 4e-10 there)."""
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    x2 = ax * ax
    small = ax * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * -0.05396825396825397)))
    t = tl.where(ax < 0.125, small, (1.0 - e) / (1.0 + e))
    return tl.where(x < 0, -t, t)


@triton.jit
def head_slope(z, pre, post, SOFTCAP: tl.constexpr):
    """d z / d a of the head transform (reference.head_factors / head_slope), from z."""
    if SOFTCAP:
        t = z / post
        return (1.0 - t * t) * (pre * post)
    else:
        return tl.zeros_like(z) + pre


@triton.jit
def _logit_tile(H, W, Bias, rows, cols, row_mask, col_mask, D, inv_temp, post,
                HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr):
    """z[rows, cols] = (h @ W.T + b) * inv_temp, or post * tanh(inv_temp * (h @ W.T + b)) with SOFTCAP
    (reference.head_factors: inv_temp is its `pre`), fp32; columns past V are -inf."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    h_base = H + rows.to(tl.int64)[:, None] * D
    w_base = W + cols.to(tl.int64)[:, None] * D
    for d0 in range(0, D, BLOCK_D):
        dk = d0 + tl.arange(0, BLOCK_D)
        d_mask = dk < D
        h = tl.load(h_base + dk[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        w = tl.load(w_base + dk[None, :], mask=col_mask[:, None] & d_mask[None, :], other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        b = tl.load(Bias + cols, mask=col_mask, other=0.0).to(tl.float32)
        acc = acc + b[None, :]
    if SOFTCAP:
        z = post * tanh(acc * inv_temp)
    else:
        z = acc * inv_temp
    return tl.where(col_mask[None, :], z, float("-inf"))


@triton.jit
def online_logsumexp(m, s, z):
    """One step of the online log-sum-exp over a [rows, cols] tile: new max, rescaled sum, the rescale factor and
    exp(z - new max)."""
    m_new = tl.maximum(m, tl.max(z, axis=1))
    rescale = tl.exp(m - m_new)
    e = tl.exp(z - m_new[:, None])
    return m_new, s * rescale + tl.sum(e, axis=1), rescale, e


@triton.jit
def _forward_kernel(H, W, Bias, Targets, M_out, S_out, T_out, Zt_out,
                    N, V, D, v_per_split, inv_temp, post,
                    HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    target = tl.load(Targets + rows, mask=row_mask, other=0)

    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t = tl.zeros((BLOCK_N,), dtype=tl.float32)
    z_target = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v_start = split * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        z = _logit_tile(H, W, Bias, rows, cols, row_mask, col_mask, D, inv_temp, post,
                        HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST, DOT_PRECISION, SOFTCAP)
        m_new, s, rescale, e = online_logsumexp(m, s, z)
        if WITH_ENTROPY:
            t = t * rescale + tl.sum(e * tl.where(col_mask[None, :], z, 0.0), axis=1)
        z_target += tl.sum(tl.where(cols[None, :] == target[:, None], z, 0.0), axis=1)
        m = m_new
    out = split.to(tl.int64) * N + rows
    tl.store(M_out + out, m, mask=row_mask)
    tl.store(S_out + out, s, mask=row_mask)
    tl.store(Zt_out + out, z_target, mask=row_mask)
    if WITH_ENTROPY:
        tl.store(T_out + out, t, mask=row_mask)


@triton.jit
def dlogit_tile(z, cols, col_mask, target, lse, S, g_logp, g_ent, inv_temp, post, WITH_ENTROPY: tl.constexpr,
                SOFTCAP: tl.constexpr):
    """d loss / d raw logit of one [rows, cols] tile from its logits z (padded columns: z = -inf, dz = 0):
    dz = g_l (1[v=y] - p) - g_H p (z - S), times d z / d a of the head (reference.head_slope)."""
    p = tl.exp(z - lse[:, None])  # 0 on padded columns
    dz = g_logp[:, None] * (tl.where(cols[None, :] == target[:, None], 1.0, 0.0) - p)
    if WITH_ENTROPY:
        dz -= g_ent[:, None] * p * tl.where(col_mask[None, :], z - S[:, None], 0.0)
    return tl.where(col_mask[None, :], dz * head_slope(z, inv_temp, post, SOFTCAP), 0.0)


@triton.jit
def _dlogit_kernel(H, W, Bias, Targets, Lse, Sz, G_logp, G_ent, dZ, N, v0, v1, D, stride_dz, inv_temp, post,
                   HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
                   UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr):
    """dZ[:, :v1 - v0] = the dlogits of vocabulary columns [v0, v1): one program per (row block, column block)
    tile recomputes the tile's logits and writes its dlogits once, in dZ's dtype (no atomics)."""
    rows, local, row_mask, col_mask = tile_of_program(N, v1 - v0, BLOCK_N, BLOCK_V, GROUP)
    cols = v0 + local
    z = _logit_tile(H, W, Bias, rows, cols, row_mask, col_mask, D, inv_temp, post,
                    HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST, DOT_PRECISION, SOFTCAP)
    lse = tl.load(Lse + rows, mask=row_mask, other=0.0)
    g_l = tl.load(G_logp + rows, mask=row_mask, other=0.0)
    target = tl.load(Targets + rows, mask=row_mask, other=-1)
    if WITH_ENTROPY:
        g_h = tl.load(G_ent + rows, mask=row_mask, other=0.0)
        s_z = tl.load(Sz + rows, mask=row_mask, other=0.0)
    else:
        g_h, s_z = g_l, lse  # unused
    dz = dlogit_tile(z, cols, col_mask, target, lse, s_z, g_l, g_h, inv_temp, post, WITH_ENTROPY, SOFTCAP)
    tl.store(dZ + rows.to(tl.int64)[:, None] * stride_dz + local[None, :], dz.to(dZ.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def tile_of_program(N, V, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, GROUP: tl.constexpr):
    """The (row block, vocab block) tile of this program, in grouped order: GROUP row blocks sweep the vocabulary
    together, so weight tiles are reused from L2."""
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(N, BLOCK_N)
    per_group = GROUP * tl.cdiv(V, BLOCK_V)
    first_n = (pid // per_group) * GROUP
    group_size = tl.minimum(n_blocks - first_n, GROUP)
    pid_n = first_n + (pid % per_group) % group_size
    pid_v = (pid % per_group) // group_size
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    return rows, cols, rows < N, cols < V


def dot_precision(x):
    """fp32 tiles multiply in full fp32 ("ieee"), as torch's fp32 matmul does; tl.dot would use TF32 otherwise."""
    return "ieee" if x.dtype == torch.float32 else "tf32"


# GPU tile configs per (kernel, input dtype): (BLOCK_N, BLOCK_V, BLOCK_D, num_warps, num_stages). Chosen on the
# ahead-of-time compile table (python -m benchmarks.aot, triton 3.6's ptxas; registers and stack per thread): the
# earlier single config 64 x 128 x 64, 8 warps, 3 stages spilled in every kernel but the log-prob forward. The
# "_bwd" rows are the dlogit kernels (128-222 registers at sm_90 bf16; the log-prob one also compiles spill-free at
# BLOCK_D=64, 254 registers: a candidate for a GPU measurement, not taken unmeasured). Every row below compiles with
# 0 spill bytes: bf16 on sm_90 and sm_80, fp32 on sm_90. Each kernel holds 255 registers or fewer x 256 threads, one
# block per SM at 8 warps (the 4-warp fp32 forward: up to two). The divergence kernels hold two logit tiles, hence
# BLOCK_V=64. fp32 tiles multiply without tensor cores (ieee dot), which needs smaller D blocks; fp16 takes bf16's
# configs.
GPU_CONFIGS = {
    ("logprob_fwd", "bf16"): (64, 128, 32, 8, 3), ("logprob_bwd", "bf16"): (64, 128, 32, 8, 3),
    ("div_lse", "bf16"): (64, 128, 32, 8, 3), ("div", "bf16"): (64, 64, 32, 8, 3),
    ("div_bwd", "bf16"): (64, 64, 32, 8, 3),
    ("logprob_fwd", "fp32"): (32, 64, 32, 4, 2), ("logprob_bwd", "fp32"): (64, 64, 16, 8, 2),
    ("div_lse", "fp32"): (64, 64, 16, 8, 2), ("div", "fp32"): (64, 64, 16, 8, 2),
    ("div_bwd", "fp32"): (64, 64, 16, 8, 1),
}


def _config(kernel, dtype):
    """Tile sizes: large tiles under the interpreter (it runs programs one after another), GPU_CONFIGS on the GPU."""
    if interpreter_on():
        return dict(BLOCK_N=32, BLOCK_V=128, BLOCK_D=64, num_warps=4, num_stages=1)
    key = "fp32" if dtype == torch.float32 else "bf16"
    bn, bv, bd, warps, stages = GPU_CONFIGS[(kernel, key)]
    return dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd, num_warps=warps, num_stages=stages)


def _vocab_splits(N, V, block_n, block_v, device):
    """Enough vocab ranges that rows x splits covers the GPU about four times over."""
    if interpreter_on() or device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    n_blocks = triton.cdiv(N, block_n)
    want = max(1, (4 * sms + n_blocks - 1) // n_blocks)
    return min(want, triton.cdiv(V, block_v))


def forward_stats(h, weight, bias, targets, valid, inv_temp, with_entropy, post=None):
    """Per row: lse, S = sum_v p_v z_v (or None) and the target logit z_y (0 when y is no column of weight: an
    ignored position, or a token on another vocabulary shard)."""
    N, D = h.shape
    V = weight.shape[0]
    cfg = _config("logprob_fwd", h.dtype)
    bn, bv = cfg["BLOCK_N"], cfg["BLOCK_V"]
    splits = _vocab_splits(N, V, bn, bv, h.device)
    v_per_split = triton.cdiv(triton.cdiv(V, splits), bv) * bv
    splits = triton.cdiv(V, v_per_split)
    f32 = dict(dtype=torch.float32, device=h.device)
    m, s, zt = (torch.empty(splits, N, **f32) for _ in range(3))
    t = torch.empty(splits, N, **f32) if with_entropy else m
    # Ignored rows carry target -1 into the kernel, so they never match a column.
    tgt = torch.where(valid, targets, torch.full_like(targets, -1))
    _forward_kernel[(triton.cdiv(N, bn), splits)](
        h, weight, bias if bias is not None else h, tgt, m, s, t, zt, N, V, D, v_per_split, inv_temp,
        1.0 if post is None else post, HAS_BIAS=bias is not None, WITH_ENTROPY=with_entropy, UPCAST=interpreter_on(),
        DOT_PRECISION=dot_precision(h), SOFTCAP=post is not None, **cfg)
    lse = merge_logsumexp(m, s)
    S = None
    if with_entropy:  # sum_v p_v z_v = (sum of e * z) / (sum of e), both rescaled to the merged max
        w = torch.exp(m - m.amax(0))
        S = (t * w).sum(0) / (s * w).sum(0)
    return lse, S, zt.sum(0)


def merge_logsumexp(m, s):
    """log-sum-exp of the whole vocabulary from per-range (max, sum of exp(z - max)), each (splits, N)."""
    m_all = m.amax(0)
    return m_all + torch.log((s * torch.exp(m - m_all)).sum(0))


def backward(h, weight, bias, targets, valid, lse, S, g_logp, g_ent, inv_temp, need_weight_grad=True, post=None,
             dh_fp32=False, chunk_cols=None):
    """Gradients of sum(g_logp * logp + g_ent * H) w.r.t. h, weight, bias: per vocabulary chunk the dlogit kernel,
    then the chunk's GEMMs (head_grads). Every row must be valid (LinearLogprobFunction compacts them away first):
    an invalid row's dlogits are 0, but its hidden state still enters dW's GEMM."""
    cfg = _config("logprob_bwd", h.dtype)
    zero = torch.zeros((), dtype=torch.float32, device=h.device)
    g_logp = torch.where(valid, g_logp.float(), zero).contiguous()
    with_entropy = g_ent is not None
    g_ent = torch.where(valid, g_ent.float(), zero).contiguous() if with_entropy else g_logp
    tgt = torch.where(valid, targets, torch.full_like(targets, -1))
    N, D = h.shape

    def fill(v0, v1, dz):
        grid = (triton.cdiv(N, cfg["BLOCK_N"]) * triton.cdiv(v1 - v0, cfg["BLOCK_V"]),)
        _dlogit_kernel[grid](
            h, weight, bias if bias is not None else h, tgt, lse, S if S is not None else lse, g_logp, g_ent, dz[0],
            N, v0, v1, D, dz[0].stride(0), inv_temp, 1.0 if post is None else post,
            HAS_BIAS=bias is not None, WITH_ENTROPY=with_entropy, GROUP=8, UPCAST=interpreter_on(),
            DOT_PRECISION=dot_precision(h), SOFTCAP=post is not None, **cfg)

    (dh, dW, db), = head_grads([(h, weight, bias, need_weight_grad)], fill, chunk_cols)
    return dh if dh_fp32 else dh.to(h.dtype), dW, db


# The dlogit chunk buffers of one backward call, [rows, chunk columns] in the operands' dtype, hold at most this many
# bytes (all heads together). At llama3-8b N=8192 bf16 that is 12288 columns: GEMMs of 12288 x 8192 x 4096, large
# enough for cuBLAS's full rate, and a peak extra memory of size(dW) + 192 MiB + 2 x N D 4 (the fp32 dh and one
# fp32 partial product) = size(dW) + 448 MiB (module docstring).
DLOGIT_CHUNK_BYTES = 192 * 2**20
CHUNK_ALIGN = 256  # columns: a multiple of every BLOCK_V and of cuBLAS's tile widths


def chunk_width(N, V, itemsize, n_heads=1, chunk_cols=None):
    """Vocabulary columns per backward chunk: chunk_cols if given, else as many as DLOGIT_CHUNK_BYTES allows."""
    if chunk_cols is None:
        chunk_cols = max(CHUNK_ALIGN, DLOGIT_CHUNK_BYTES // (n_heads * N * itemsize) // CHUNK_ALIGN * CHUNK_ALIGN)
    elif int(chunk_cols) < 1:
        raise ValueError(f"chunk_cols must be a positive number of vocabulary columns, got {chunk_cols}")
    return min(V, int(chunk_cols))


def head_grads(heads, fill_dlogits, chunk_cols=None):
    """The GEMM half of every backward here, with no atomics and a fixed order (bitwise repeatable).

    heads: [(h (N, D), weight (V, D), bias (V,) or None, need_weight_grad)], one per head sharing the vocabulary.
    For each vocabulary chunk [v0, v1): fill_dlogits(v0, v1, dz) writes each head's dlogits into dz[i]
    ([N, v1 - v0] views of one buffer per head, in the operands' dtype); then per head
        dW[v0:v1] = dz.T @ h     one GEMM over all rows, fp32 accumulation inside, stored once in weight's dtype
        dh       += dz @ W[v0:v1]  into an fp32 [N, D] accumulator
        db[v0:v1] = column sums of dz (fp32).
    Returns [(dh fp32, dW or None, db or None)] per head."""
    N, V = heads[0][0].shape[0], heads[0][1].shape[0]
    dtype, device = heads[0][0].dtype, heads[0][0].device
    width = chunk_width(N, V, dtype.itemsize, len(heads), chunk_cols)
    bufs = [torch.empty(N, width, dtype=dtype, device=device) for _ in heads]
    out = []
    for h, w, b, need_w in heads:
        out.append((torch.zeros(h.shape, dtype=torch.float32, device=device),
                    torch.empty(w.shape, dtype=w.dtype, device=device) if need_w else None,
                    torch.empty(V, dtype=b.dtype, device=device) if b is not None else None))
    for v0 in range(0, V, width):
        v1 = min(V, v0 + width)
        dz = [buf[:, :v1 - v0] for buf in bufs]
        fill_dlogits(v0, v1, dz)
        for (h, w, b, _), (dh, dW, db), dz_i in zip(heads, out, dz):
            if dW is not None:
                torch.mm(dz_i.T, h, out=dW[v0:v1])
            add_mm_fp32(dh, dz_i, w[v0:v1])
            if db is not None:
                db[v0:v1] = dz_i.sum(0, dtype=torch.float32)
    del bufs
    return out


def add_mm_fp32(acc, a, b):
    """acc += a @ b, accumulated in fp32: in place for fp32 operands; bf16 / fp16 ones through cuBLAS's fp32-output
    GEMM on CUDA (one fp32 temporary of acc's size), upcast copies elsewhere (the interpreter's CPU tests)."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif a.is_cuda:
        try:
            acc += torch.mm(a, b, out_dtype=torch.float32)  # torch >= 2.8
        except (TypeError, RuntimeError) as e:  # an older torch, or no fp32-output GEMM for these operands
            if "out of memory" in str(e):
                raise
            acc += (a @ b).float()  # the product rounded to a's dtype once per chunk
    else:
        acc.addmm_(a.float(), b.float())
