"""Triton kernels for the exact whole-vocabulary f-divergence (math in linear_divergence.py's docstring).

Forward, two streaming passes over vocab tiles (each tile = two tl.dot logit tiles, policy and reference):
  1. both log-sum-exps, online (max / sum-exp), split over vocab ranges and merged in torch;
  2. D = sum_v q_v f(u_v) and C = sum_v q_v u_v f'(u_v), which backward needs.
Why two passes for every kind: the KL forms could fold into pass 1 (sum q (z_r - z) online), but JS, alpha, TV and
Hellinger need both normalizers before the first term, so one code path serves all kinds; the extra pass costs two
more logit tiles per vocab block (unmeasured on GPU yet: the GPU script times it).
Backward, in vocabulary chunks as linear_logprob's (linear_logprob_triton.head_grads; the reasoning is there): a
Triton kernel recomputes both logit tiles of a chunk and writes dz = g (phi - p C) (and the reference-side dlogits
when asked) once; cuBLAS then does each head's dW[chunk] and dh. No atomics: bitwise-repeatable gradients.
Saved state is O(N): the two lse's, D and C.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import interpreter_on
from .linear_logprob_triton import (_config, _logit_tile, _vocab_splits, dot_precision, head_grads, head_slope,
                                    merge_logsumexp, online_logsumexp, tile_of_program)
from .token_loss_triton import KIND_IDS, f_and_grad


@triton.jit
def _lse2_kernel(H, W, Bias, Hr, Wr, BiasR, M, S, Mr, Sr, N, V, D, Dr, v_per_split, pre, post, pre_r, post_r,
                 HAS_BIAS: tl.constexpr, HAS_RBIAS: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                 UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr, SOFTCAP_R: tl.constexpr):
    pid_n, split = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    mr = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    sr = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v_start = split * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        z = _logit_tile(H, W, Bias, rows, cols, row_mask, col_mask, D, pre, post,
                        HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST, DOT_PRECISION, SOFTCAP)
        m, s, _, _ = online_logsumexp(m, s, z)
        zr = _logit_tile(Hr, Wr, BiasR, rows, cols, row_mask, col_mask, Dr, pre_r, post_r,
                         HAS_RBIAS, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST, DOT_PRECISION, SOFTCAP_R)
        mr, sr, _, _ = online_logsumexp(mr, sr, zr)
    out = split.to(tl.int64) * N + rows
    tl.store(M + out, m, mask=row_mask)
    tl.store(S + out, s, mask=row_mask)
    tl.store(Mr + out, mr, mask=row_mask)
    tl.store(Sr + out, sr, mask=row_mask)


@triton.jit
def _tile_terms(H, W, Bias, Hr, Wr, BiasR, rows, cols, row_mask, col_mask, lse, lse_r, D, Dr, pre, post, pre_r,
                post_r, alpha, KIND: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RBIAS: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr, SOFTCAP_R: tl.constexpr):
    """For one tile: p, q f(u), q u f'(u), q (zeros on padded columns), and both heads' d z / d a."""
    z = _logit_tile(H, W, Bias, rows, cols, row_mask, col_mask, D, pre, post,
                    HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST, DOT_PRECISION, SOFTCAP)
    zr = _logit_tile(Hr, Wr, BiasR, rows, cols, row_mask, col_mask, Dr, pre_r, post_r,
                     HAS_RBIAS, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST, DOT_PRECISION, SOFTCAP_R)
    live = col_mask[None, :]
    # Padded columns: weight q = 0 and ratio 1, which every generator maps to 0.
    log_p = tl.where(live, z - lse[:, None], 0.0)
    log_q = tl.where(live, zr - lse_r[:, None], 0.0)
    lw = tl.where(live, log_q, float("-inf"))
    f, phi = f_and_grad(log_p - log_q, lw, KIND, alpha)
    p = tl.where(live, tl.exp(log_p), 0.0)
    slope = head_slope(tl.where(live, z, 0.0), pre, post, SOFTCAP)
    slope_r = head_slope(tl.where(live, zr, 0.0), pre_r, post_r, SOFTCAP_R)
    return p, tl.where(live, f, 0.0), tl.where(live, phi, 0.0), tl.exp(lw), slope, slope_r


@triton.jit
def _div_kernel(H, W, Bias, Hr, Wr, BiasR, Lse, LseR, Dout, Cout, N, V, D, Dr, v_per_split, pre, post, pre_r, post_r,
                alpha, KIND: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RBIAS: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr, SOFTCAP_R: tl.constexpr):
    pid_n, split = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    lse = tl.load(Lse + rows, mask=row_mask, other=0.0)
    lse_r = tl.load(LseR + rows, mask=row_mask, other=0.0)
    acc_d = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_c = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v_start = split * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        p, f, phi, q, _, _ = _tile_terms(H, W, Bias, Hr, Wr, BiasR, rows, cols, row_mask, cols < v_end, lse, lse_r,
                                         D, Dr, pre, post, pre_r, post_r, alpha, KIND, HAS_BIAS, HAS_RBIAS, BLOCK_N,
                                         BLOCK_V, BLOCK_D, UPCAST, DOT_PRECISION, SOFTCAP, SOFTCAP_R)
        acc_d += tl.sum(f, axis=1)
        acc_c += tl.sum(phi, axis=1)
    out = split.to(tl.int64) * N + rows
    tl.store(Dout + out, acc_d, mask=row_mask)
    tl.store(Cout + out, acc_c, mask=row_mask)


@triton.jit
def _div_dlogit_kernel(H, W, Bias, Hr, Wr, BiasR, Lse, LseR, Div, C, G, dZ, dZr, N, v0, v1, D, Dr, stride_dz,
                       pre, post, pre_r, post_r, alpha,
                       KIND: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RBIAS: tl.constexpr, NEED_REF: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
                       UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr,
                       SOFTCAP_R: tl.constexpr):
    """dZ (and dZr) [:, :v1 - v0] = both heads' dlogits of vocabulary columns [v0, v1), each tile written once."""
    rows, local, row_mask, col_mask = tile_of_program(N, v1 - v0, BLOCK_N, BLOCK_V, GROUP)
    cols = v0 + local
    lse = tl.load(Lse + rows, mask=row_mask, other=0.0)
    lse_r = tl.load(LseR + rows, mask=row_mask, other=0.0)
    p, f, phi, q, slope, slope_r = _tile_terms(H, W, Bias, Hr, Wr, BiasR, rows, cols, row_mask, col_mask, lse, lse_r,
                                               D, Dr, pre, post, pre_r, post_r, alpha, KIND, HAS_BIAS, HAS_RBIAS,
                                               BLOCK_N, BLOCK_V, BLOCK_D, UPCAST, DOT_PRECISION, SOFTCAP, SOFTCAP_R)
    c = tl.load(C + rows, mask=row_mask, other=0.0)
    g = tl.load(G + rows, mask=row_mask, other=0.0)
    keep = row_mask[:, None] & col_mask[None, :]
    out = rows.to(tl.int64)[:, None] * stride_dz + local[None, :]
    dz = tl.where(keep, g[:, None] * (phi - p * c[:, None]) * slope, 0.0)
    tl.store(dZ + out, dz.to(dZ.dtype.element_ty), mask=keep)
    if NEED_REF:
        dv = tl.load(Div + rows, mask=row_mask, other=0.0)
        dzr = tl.where(keep, g[:, None] * (f - phi - q * (dv - c)[:, None]) * slope_r, 0.0)
        tl.store(dZr + out, dzr.to(dZr.dtype.element_ty), mask=keep)


def _head_args(heads):
    """(pre, post, pre_r, post_r) floats and the SOFTCAP flags of the kernels (post None: no cap)."""
    pre, post, pre_r, post_r = heads
    return ((pre, 1.0 if post is None else post, pre_r, 1.0 if post_r is None else post_r),
            dict(SOFTCAP=post is not None, SOFTCAP_R=post_r is not None))


def forward(h, weight, bias, rh, rweight, rbias, valid, heads, kind, alpha, shard=None):
    """D per row and (lse, lse_r, C) for backward; with a VocabShard (distributed.py) the log-sum-exps are merged
    over the group between the two passes and D, C summed over it after the second."""
    N, D = h.shape
    Dr, V = rh.shape[1], weight.shape[0]
    cfg, cfg_div = _config("div_lse", h.dtype), _config("div", h.dtype)
    bn, bv = cfg["BLOCK_N"], cfg["BLOCK_V"]
    splits = _vocab_splits(N, V, bn, bv, h.device)
    v_per_split = triton.cdiv(triton.cdiv(V, splits), bv) * bv
    splits = triton.cdiv(V, v_per_split)
    f32 = dict(dtype=torch.float32, device=h.device)
    m, s, mr, sr = (torch.empty(splits, N, **f32) for _ in range(4))
    common = dict(HAS_BIAS=bias is not None, HAS_RBIAS=rbias is not None, UPCAST=interpreter_on(),
                  DOT_PRECISION=dot_precision(h), **_head_args(heads)[1])
    head = _head_args(heads)[0]
    b_arg, rb_arg = bias if bias is not None else h, rbias if rbias is not None else rh
    grid = (triton.cdiv(N, bn), splits)
    _lse2_kernel[grid](h, weight, b_arg, rh, rweight, rb_arg, m, s, mr, sr, N, V, D, Dr, v_per_split, *head,
                       **common, **cfg)
    lse, lse_r = merge_logsumexp(m, s), merge_logsumexp(mr, sr)
    if shard is not None:
        from .distributed import merge_lse
        lse, lse_r = (x.contiguous() for x in merge_lse(shard, lse, lse_r))
    d_part, c_part = torch.empty(splits, N, **f32), torch.empty(splits, N, **f32)
    # Same vocab ranges (v_per_split) as pass 1; its own tiles, so its own row-block count.
    _div_kernel[(triton.cdiv(N, cfg_div["BLOCK_N"]), splits)](
        h, weight, b_arg, rh, rweight, rb_arg, lse, lse_r, d_part, c_part, N, V, D, Dr, v_per_split, *head, alpha,
        KIND=KIND_IDS[kind], **common, **cfg_div)
    d, c = d_part.sum(0), c_part.sum(0)
    if shard is not None:
        from .distributed import all_reduce_sum
        d, c = all_reduce_sum(shard, d, c)
    div = torch.where(valid, d, torch.zeros_like(lse))
    return div, (lse, lse_r, c)


def backward(h, weight, bias, rh, rweight, rbias, valid, div, stats, g, heads, kind, alpha, need_ref, dh_fp32=False,
             chunk_cols=None):
    """Per vocabulary chunk the dlogit kernel (both heads' dlogits when need_ref), then the chunk's GEMMs
    (linear_logprob_triton.head_grads). Every row must be valid (the Function compacts them away first)."""
    lse, lse_r, c = stats
    N, D = h.shape
    Dr = rh.shape[1]
    cfg = _config("div_bwd", h.dtype)
    g = torch.where(valid, g.float(), torch.zeros((), dtype=torch.float32, device=h.device)).contiguous()
    head, flags = _head_args(heads)

    def fill(v0, v1, dz):
        grid = (triton.cdiv(N, cfg["BLOCK_N"]) * triton.cdiv(v1 - v0, cfg["BLOCK_V"]),)
        _div_dlogit_kernel[grid](
            h, weight, bias if bias is not None else h, rh, rweight, rbias if rbias is not None else rh,
            lse, lse_r, div, c, g, dz[0], dz[-1], N, v0, v1, D, Dr, dz[0].stride(0), *head, alpha,
            KIND=KIND_IDS[kind], HAS_BIAS=bias is not None, HAS_RBIAS=rbias is not None, NEED_REF=need_ref,
            GROUP=8, UPCAST=interpreter_on(), DOT_PRECISION=dot_precision(h), **flags, **cfg)

    policy = (h, weight, bias, True)
    grads = head_grads([policy, (rh, rweight, rbias, True)] if need_ref else [policy], fill, chunk_cols)
    h_dtype = torch.float32 if dh_fp32 else h.dtype
    out = []
    for dh, dW, db in grads:
        out += [dh.to(h_dtype), dW, db]
    return out + [None, None, None] * (2 - len(grads))
