"""Exact f-divergence over the whole vocabulary between two linear heads, without [tokens x vocab] buffers.

    D_f(t) = sum_v q_v f(p_v / q_v),  p = softmax((h W^T + b) / T),  q = softmax((h_r W_r^T + b_r) / T)

With r_v = log p_v - log q_v and phi_v = q_v u_v f'(u_v) (reference.f_generator's derivative in r, weighted by q):
    dD/dz_v   = phi_v - p_v C,                  C = sum_v phi_v
    dD/dz_r,v = q_v f(u_v) - phi_v - q_v (D - C)     (only when ref_requires_grad)

Torch path: forward in row chunks holding whole rows (both log-sum-exps exact, then D and C per row; value and
slope phi from reference.f_generator_parts, so the torch form of the math exists once), except forward KL, which
decomposes into one pass over tiles (_fkl_forward); backward in [all rows, vocab chunk] tiles like linear_logprob's,
recomputing both heads' log-probs from the saved log-sum-exps: six matmuls in all (eager autograd: four, but a
dozen [N, V] passes more). Triton path: see
linear_divergence_triton.py.
"""
from __future__ import annotations

import torch

from . import _checks
from . import reference as ref
from .linear_logprob import _tile_logits, compute_dtype, rows_with_loss, scatter_rows, tiles
from .losses import _check_kind

# Forward: rows in chunks whose two [rows, V] logit buffers fit CHUNK_BYTES (the rest of its work goes in column
# blocks of BLOCK_BYTES). Backward: [rows, vocab chunk] tiles of TILE_BYTES, about eight alive at once. At smollm2's
# shape (V=49152) the forward's chunks have 128 rows: fewer make its two matmuls markedly slower (85 rows: 2.1x the
# time of one large matmul, 2 CPU cores).
CHUNK_BYTES = 48 * 2**20
BLOCK_BYTES = 4 * 2**20
TILE_BYTES = 4 * 2**20


def _chunk_rows(V):
    return max(1, CHUNK_BYTES // (2 * V * 4))


def _column_blocks(rows, V):
    width = max(1, BLOCK_BYTES // (rows * 4))
    return [slice(v, min(V, v + width)) for v in range(0, V, width)]


def _row_logsumexp(z, blocks):
    """logsumexp over dim 1 with [rows, block] temporaries only."""
    m = z.amax(1, keepdim=True)
    s = sum(torch.exp(z[:, b] - m).sum(1) for b in blocks)
    return m.squeeze(1) + s.log()


def _generator_and_slope(log_ratio, log_q, kind, alpha, g=None, need_value=True):
    """q f(u) (or None) and its derivative in the log-ratio r, phi = q u f'(u), elementwise; the slope times the
    per-row g if given."""
    value, slope = ref.f_generator_parts(log_ratio, kind, alpha, log_weight=log_q)
    slope = slope()
    return value() if need_value else None, slope if g is None else slope.mul_(g[:, None])


def _fkl_forward(h, weight, bias, rh, rweight, rbias, heads, cdt, out):
    """Forward KL in one pass over [rows, vocab chunk] tiles, with online log-sum-exps:
    D = sum_v q_v (log q_v - log p_v) = E_q[z_r - z] - lse_q + lse_p, and C = sum_v (p_v - q_v) = 0. The general
    forward needs both normalizers before it can evaluate f, hence whole rows; KL's decomposition does not."""
    lse_p, lse_q, div, C = out
    N, V = h.shape[0], weight.shape[0]
    row_blocks, vocab_chunks = tiles(N, V, torch.finfo(cdt).bits // 8, TILE_BYTES)
    for rb in row_blocks:
        m_p = m_q = None
        for vc in vocab_chunks:
            z = _tile_logits(h[rb], weight, bias, vc, heads[0], cdt, post=heads[1])
            zr = _tile_logits(rh[rb], rweight, rbias, vc, heads[2], cdt, post=heads[3])
            new_p, new_q = z.amax(1), zr.amax(1)
            if m_p is not None:
                new_p, new_q = torch.maximum(m_p, new_p), torch.maximum(m_q, new_q)
            e_q = torch.exp(zr - new_q[:, None])
            s_p_c = torch.exp(z - new_p[:, None]).sum(1)
            s_q_c, a_c = e_q.sum(1), torch.linalg.vecdot(e_q, zr.sub_(z))  # a = sum e_q (z_r - z)
            if m_p is None:
                s_p, s_q, a = s_p_c, s_q_c, a_c
            else:
                rescale_q = torch.exp(m_q - new_q)
                s_p = s_p * torch.exp(m_p - new_p) + s_p_c
                s_q, a = s_q * rescale_q + s_q_c, a * rescale_q + a_c
            m_p, m_q = new_p, new_q
            del z, zr, e_q  # freed before the next tile is allocated
        lse_p[rb], lse_q[rb] = m_p + s_p.log(), m_q + s_q.log()
        div[rb] = a / s_q - lse_q[rb] + lse_p[rb]
        C[rb] = 0.0


def _chunk_logits(h, weight, bias, rh, rweight, rbias, heads, cdt, rows):
    """Both heads' logits of a row chunk, whole rows (this weight's vocabulary)."""
    everything = slice(0, weight.shape[0])
    return (_tile_logits(h[rows], weight, bias, everything, heads[0], cdt, post=heads[1]),
            _tile_logits(rh[rows], rweight, rbias, everything, heads[2], cdt, post=heads[3]))


def torch_forward(h, weight, bias, rh, rweight, rbias, valid, heads, kind, alpha, shard=None):
    """Returns D (N,) and, for backward, (lse_p, lse_q, D, C) with C = sum_v phi_v. heads = (pre, post, pre_r,
    post_r): both heads' reference.head_factors. With a VocabShard the log-sum-exps are merged over the group first
    (one pass more over this shard's logits), then D and C are this shard's partial sums, summed over the group."""
    N, V = h.shape[0], weight.shape[0]
    cdt = compute_dtype(h.dtype)
    lse_p, lse_q, div, C = (torch.empty(N, dtype=cdt, device=h.device) for _ in range(4))
    if kind == "fkl" and shard is None:
        with torch.no_grad():
            _fkl_forward(h, weight, bias, rh, rweight, rbias, heads, cdt, (lse_p, lse_q, div, C))
        div = torch.where(valid, div, torch.zeros((), dtype=cdt, device=h.device))
        return div, (lse_p, lse_q, div, C)
    step = _chunk_rows(V)
    row_chunks = [slice(r0, min(N, r0 + step)) for r0 in range(0, N, step)]
    with torch.no_grad():
        if shard is not None:
            from .distributed import all_reduce_sum, merge_lse
            for sl in row_chunks:
                z, zr = _chunk_logits(h, weight, bias, rh, rweight, rbias, heads, cdt, sl)
                blocks = _column_blocks(z.shape[0], V)
                lse_p[sl], lse_q[sl] = _row_logsumexp(z, blocks), _row_logsumexp(zr, blocks)
                del z, zr
            lse_p, lse_q = merge_lse(shard, lse_p, lse_q)
        for sl in row_chunks:
            z, zr = _chunk_logits(h, weight, bias, rh, rweight, rbias, heads, cdt, sl)
            blocks = _column_blocks(z.shape[0], V)
            if shard is None:
                lse_p[sl], lse_q[sl] = _row_logsumexp(z, blocks), _row_logsumexp(zr, blocks)
            div[sl], C[sl] = 0.0, 0.0
            for b in blocks:
                log_q = zr[:, b] - lse_q[sl, None]
                val, slope = _generator_and_slope(z[:, b] - lse_p[sl, None] - log_q, log_q, kind, alpha)
                div[sl] += val.sum(-1)
                C[sl] += slope.sum(-1)
                del log_q, val, slope
            del z, zr  # freed before the next chunk's buffers are allocated
        if shard is not None:
            div, C = all_reduce_sum(shard, div, C)
    zero = torch.zeros((), dtype=cdt, device=h.device)
    div = torch.where(valid, div, zero)
    return div, (lse_p, lse_q, div, C)


def torch_backward(h, weight, bias, rh, rweight, rbias, valid, stats, g, heads, kind, alpha, need_ref, dh_fp32=False):
    """dD/dz_v = phi_v - p_v C and dD/dz_r,v = q_v f(u_v) - phi_v - q_v (D - C), times g, tile by tile; then times
    d z / d a of each head: a constant (folded into h) without a softcap, a tile (reference.head_slope) with one."""
    pre, post, pre_r, post_r = heads
    lin, lin_r = (pre if post is None else 1.0), (pre_r if post_r is None else 1.0)
    lse_p, lse_q, div, C = stats
    N, V = h.shape[0], weight.shape[0]
    cdt = lse_p.dtype
    zero = torch.zeros((), dtype=cdt, device=h.device)
    g = torch.where(valid, g.to(cdt), zero)
    if not bool(valid.all()):
        # Ignored rows may hold NaN/inf (0 * NaN is NaN): zero hidden states and finite statistics.
        vm = valid[:, None]
        h, rh = torch.where(vm, h, 0.0), torch.where(vm, rh, 0.0)
        lse_p, lse_q, div, C = (torch.where(valid, x, zero) for x in (lse_p, lse_q, div, C))
    gC, gDC = g * C, g * (div - C)
    dh = torch.zeros(h.shape, dtype=cdt, device=h.device)
    dW = torch.zeros(weight.shape, dtype=cdt, device=h.device)
    db = torch.zeros(V, dtype=cdt, device=h.device) if bias is not None else None
    if need_ref:
        drh = torch.zeros(rh.shape, dtype=cdt, device=h.device)
        drW = torch.zeros(rweight.shape, dtype=cdt, device=h.device)
        drb = torch.zeros(V, dtype=cdt, device=h.device) if rbias is not None else None
    row_blocks, vocab_chunks = tiles(N, V, torch.finfo(cdt).bits // 8, TILE_BYTES)
    for rb in row_blocks:
        hb, rhb = h[rb], rh[rb]
        hb_c, rhb_c = hb.to(cdt) * lin, rhb.to(cdt) * lin_r
        for vc in vocab_chunks:
            log_p = _tile_logits(hb, weight, bias, vc, pre, cdt, -lse_p[rb, None], post)
            log_q = _tile_logits(rhb, rweight, rbias, vc, pre_r, cdt, -lse_q[rb, None], post_r)
            J = None if post is None else ref.head_slope(log_p + lse_p[rb, None], pre, post)
            J_r = None if post_r is None or not need_ref else ref.head_slope(log_q + lse_q[rb, None], pre_r, post_r)
            val, slope = _generator_and_slope(log_p - log_q, log_q, kind, alpha, g[rb], need_value=need_ref)
            dz = slope - log_p.exp_().mul_(gC[rb, None])  # g (phi - p C)
            if J is not None:
                dz.mul_(J)
            dh[rb].addmm_(dz, weight[vc].to(cdt))
            dW[vc].addmm_(dz.T, hb_c)
            if db is not None:
                db[vc] += dz.sum(0) * lin
            if need_ref:  # g (q f - phi - q (D - C))
                dzr = (val * g[rb, None]).sub_(slope).sub_(log_q.exp_().mul_(gDC[rb, None]))
                if J_r is not None:
                    dzr.mul_(J_r)
                drh[rb].addmm_(dzr, rweight[vc].to(cdt))
                drW[vc].addmm_(dzr.T, rhb_c)
                if drb is not None:
                    drb[vc] += dzr.sum(0) * lin_r
                del dzr
            del log_p, log_q, val, slope, dz, J, J_r  # freed before the next tile's buffers are allocated
    h_dtype = cdt if dh_fp32 else h.dtype
    out = [(dh * lin).to(h_dtype), dW.to(weight.dtype), None if db is None else db.to(bias.dtype)]
    if need_ref:
        out += [(drh * lin_r).to(h_dtype), drW.to(rweight.dtype), None if drb is None else drb.to(rbias.dtype)]
    else:
        out += [None, None, None]
    return out


def fdiv_forward(h, weight, bias, rh, rweight, rbias, valid, heads, kind, alpha, impl, shard=None):
    """Rows as given (no compaction): (D per row, the statistics fdiv_backward needs)."""
    w, b, rw, rb = _real_rows(shard, weight, bias, rweight, rbias)
    if w.shape[0] == 0:  # a shard wholly past the vocabulary: only the group's statistics to join
        return _empty_shard_forward(shard, h, valid)
    if impl == "triton":
        from . import linear_divergence_triton as tk
        return tk.forward(h, w, b, rh, rw, rb, valid, heads, kind, alpha, shard)
    return torch_forward(h, w, b, rh, rw, rb, valid, heads, kind, alpha, shard)


def fdiv_backward(h, weight, bias, rh, rweight, rbias, valid, div, stats, g, heads, kind, alpha, impl, shard,
                  need_ref, chunk_cols=None):
    """[dh, dW, db, drh, drW, drb] (None where not needed) of the rows fdiv_forward saw."""
    w, b, rw, rb = _real_rows(shard, weight, bias, rweight, rbias)
    vp = shard is not None
    if w.shape[0] == 0:
        grads = [torch.zeros(h.shape, dtype=torch.float32, device=h.device), None, None]
        grads += [torch.zeros(rh.shape, dtype=torch.float32, device=h.device), None, None] if need_ref else \
            [None] * 3
    elif impl == "triton":
        from . import linear_divergence_triton as tk
        grads = tk.backward(h, w, b, rh, rw, rb, valid, div, stats, g, heads, kind, alpha, need_ref, vp, chunk_cols)
    else:
        grads = torch_backward(h, w, b, rh, rw, rb, valid, stats, g, heads, kind, alpha, need_ref, vp)
    grads = list(grads)
    if vp:
        from .distributed import all_reduce_sum, pad_rows
        for i, x, full in ((0, h, None), (1, weight, weight), (2, bias, bias), (3, rh, None),
                           (4, rweight, rweight), (5, rbias, rbias)):
            if i >= 3 and not need_ref or x is None:
                continue
            grads[i] = all_reduce_sum(shard, grads[i])[0].to(x.dtype) if full is None else pad_rows(grads[i], full)
    return grads


class LinearFDivergenceFunction(torch.autograd.Function):
    """Flat inputs (linear_f_divergence). With a VocabShard both heads' weights and biases are this rank's shard;
    the divergence is the whole-vocabulary one and dh (and drh) are summed over the group. Masked-out rows are
    compacted away first."""

    @staticmethod
    def forward(ctx, h, weight, bias, rh, rweight, rbias, valid, heads, kind, alpha, impl, shard=None,
                chunk_cols=None):
        (rows, ctx.any_loss), n_all = rows_with_loss(valid), h.shape[0]
        h_all, rh_all = h, rh
        if rows is not None:  # masked-out rows never enter a matmul
            h, rh, valid = h.index_select(0, rows), rh.index_select(0, rows), valid[rows]
        div, stats = fdiv_forward(h, weight, bias, rh, rweight, rbias, valid, heads, kind, alpha, impl, shard)
        # The callers' h and rh are saved whole (no copies held): backward gathers their rows again.
        ctx.save_for_backward(h_all, weight, bias, rh_all, rweight, rbias, valid, div, rows, *(stats or ()))
        ctx.args = (heads, kind, alpha, impl, shard, chunk_cols)
        return div if rows is None else scatter_rows(div, rows, n_all)

    @staticmethod
    def backward(ctx, g):
        h_all, weight, bias, rh_all, rweight, rbias, valid, div, rows, *stats = ctx.saved_tensors
        heads, kind, alpha, impl, shard, chunk_cols = ctx.args
        need_ref = any(ctx.needs_input_grad[3:6])
        if not ctx.any_loss:  # every row masked out (the same on every rank of a group)
            zeros = [None if x is None or not need else torch.zeros_like(x)
                     for x, need in zip((h_all, weight, bias, rh_all, rweight, rbias), ctx.needs_input_grad)]
            return (*zeros, *([None] * 7))
        h, rh = h_all, rh_all
        if rows is not None:
            h, rh, g = h_all.index_select(0, rows), rh_all.index_select(0, rows), g[rows]
        grads = fdiv_backward(h, weight, bias, rh, rweight, rbias, valid, div, stats, g, heads, kind, alpha, impl,
                              shard, need_ref, chunk_cols)
        if rows is not None:
            for i in (0, 3):
                if grads[i] is not None:
                    grads[i] = scatter_rows(grads[i], rows, h_all.shape[0])
        return (*grads, None, None, None, None, None, None, None)


def _real_rows(shard, *tensors):
    """Each (V_shard, ...) tensor (or None) cut to the shard's vocabulary rows (its padding left out)."""
    if shard is None:
        return tensors
    return [None if x is None else x[:shard.real] for x in tensors]


def _empty_shard_forward(shard, h, valid):
    """The collectives of a forward pass on a shard with no vocabulary rows: log-sum-exps of -inf, zero sums."""
    from .distributed import all_reduce_sum, merge_lse
    cdt = compute_dtype(h.dtype)
    none = torch.full((h.shape[0],), float("-inf"), dtype=cdt, device=h.device)
    lse_p, lse_q = merge_lse(shard, none, none)
    div, C = all_reduce_sum(shard, torch.zeros_like(lse_p), torch.zeros_like(lse_p))
    div = torch.where(valid, div, torch.zeros_like(div))
    return div, (lse_p, lse_q, div, C)


def linear_f_divergence(hidden, weight, ref_hidden, ref_weight, *, kind="fkl", alpha=0.5, bias=None, ref_bias=None,
                        temperature=1.0, mask=None, ref_requires_grad=False, impl="auto", softcap=None,
                        logit_scale=1.0, ref_softcap=None, ref_logit_scale=1.0, process_group=None, vocab_size=None,
                        chunk_cols=None):
    """Per-position exact D_f(pi_theta || pi_ref) between softmax(hidden W^T + b)/T and softmax(ref_hidden W_ref^T
    + b_ref)/T, summed over the whole vocabulary, without [tokens x vocab] buffers.

    Args:
        hidden (..., D), weight (V, D), bias (V,): the policy head. Differentiable.
        ref_hidden (..., D_ref), ref_weight (V, D_ref), ref_bias: the reference head (D_ref may differ from D).
            Constant unless ref_requires_grad=True.
        kind: as dk.f_divergence ("fkl", "fkl_k1" (equal to "fkl" here), "js", "alpha", "rkl", "tv", "hellinger").
        mask: optional (...) bool (or 0 / 1 integer or float; other values are an error); masked-out positions
            give 0 and no gradient. Every tensor must be on hidden's device.
        impl: "auto" | "triton" | "torch" | "reference".
        softcap, logit_scale / ref_softcap, ref_logit_scale: each head's final-logit softcap (None = off) and logit
            scale, applied as in dk.linear_logprob (scale, then cap, then the shared temperature).
        process_group, vocab_size: vocab-parallel heads (dph_kernels.distributed, as in dk.linear_logprob): weight,
            bias, ref_weight and ref_bias are this rank's shards of both heads (the same rows); the divergence is
            the whole-vocabulary one on every rank, hidden's (and ref_hidden's) gradient complete on every rank.
    Returns: fp32 (...).
    """
    _check_kind(kind, alpha)
    allow64 = impl in ("torch", "reference")
    _, _, V = _checks.check_linear_inputs(hidden, weight, None, bias, allow_fp64=allow64)
    _checks.check_ref_head(hidden, V, ref_hidden, ref_weight, ref_bias, allow_fp64=allow64)
    lead = hidden.shape[:-1]
    if mask is None:
        mask = torch.ones(lead, dtype=torch.bool, device=hidden.device)
    mask = _checks.check_mask("mask", mask, shape=lead, shape_of="hidden's leading", device=hidden.device)
    temperature = _checks.check_temperature(temperature)
    softcap, logit_scale = _checks.check_head(softcap, logit_scale)
    ref_softcap, ref_logit_scale = _checks.check_head(ref_softcap, ref_logit_scale, "ref_")
    impl = _checks.resolve_impl(impl, hidden.device)
    if process_group is not None and impl == "reference":
        raise ValueError("process_group needs impl 'auto', 'torch' or 'triton' (the reference materializes one head)")
    from .distributed import vocab_shard
    shard = vocab_shard(process_group, weight, vocab_size)
    if impl == "reference":
        if not ref_requires_grad:
            ref_hidden, ref_weight = ref_hidden.detach(), ref_weight.detach()
            ref_bias = None if ref_bias is None else ref_bias.detach()
        out = ref.linear_f_divergence(hidden, weight, ref_hidden, ref_weight, kind, alpha, bias, ref_bias,
                                      temperature, mask.bool(), softcap, logit_scale, ref_softcap, ref_logit_scale)
        return out if hidden.dtype == torch.float64 else out.float()
    heads = (*ref.head_factors(softcap, logit_scale, temperature),
             *ref.head_factors(ref_softcap, ref_logit_scale, temperature))
    return f_divergence_core(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, mask, heads, kind, alpha, impl,
                             ref_requires_grad, shard, chunk_cols)


def f_divergence_core(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, mask, heads, kind, alpha, impl,
                      ref_requires_grad=False, shard=None, chunk_cols=None):
    """linear_f_divergence after its checks (also the fused loss's entry): mask bool of hidden's leading shape,
    heads = both heads' (pre, post) factors. Returns fp32 (or fp64) D_f of hidden's leading shape."""
    if not ref_requires_grad:
        ref_hidden, ref_weight = ref_hidden.detach(), ref_weight.detach()
        ref_bias = None if ref_bias is None else ref_bias.detach()
    lead = hidden.shape[:-1]
    h = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    rh = ref_hidden.reshape(-1, ref_hidden.shape[-1]).contiguous()
    if torch.compiler.is_compiling():  # one custom op: no graph break, no host sync (no row compaction)
        if shard is not None:
            raise NotImplementedError("process_group (vocab-parallel) is not supported under torch.compile")
        div = torch.ops.dph.linear_f_divergence(h, weight.contiguous(), bias, rh, ref_weight.contiguous(), ref_bias,
                                                mask.reshape(-1), *heads, kind, alpha, impl)[0]
    else:
        div = LinearFDivergenceFunction.apply(h, weight.contiguous(), bias, rh, ref_weight.contiguous(), ref_bias,
                                              mask.reshape(-1), heads, kind, alpha, impl, shard, chunk_cols)
    if hidden.dtype != torch.float64:
        div = div.float()
    return div.reshape(lead)


# torch.compile / CUDA graphs: the same math as one custom op (see linear_logprob.py's section of the same name).
@torch.library.custom_op("dph::linear_f_divergence", mutates_args=())
def linear_f_divergence_op(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rh: torch.Tensor,
                           rweight: torch.Tensor, rbias: torch.Tensor | None, valid: torch.Tensor, pre: float,
                           post: float | None, pre_r: float, post_r: float | None, kind: str, alpha: float,
                           impl: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(D, and fdiv_forward's statistics padded to four: Triton's three, the torch path's four)."""
    div, stats = fdiv_forward(h, weight, bias, rh, rweight, rbias, valid, (pre, post, pre_r, post_r), kind, alpha,
                              impl)
    stats = [x.clone() if x is div else x for x in stats]
    return (div, *stats, *[torch.zeros_like(div)] * (4 - len(stats)))


@linear_f_divergence_op.register_fake
def _(h, weight, bias, rh, rweight, rbias, valid, pre, post, pre_r, post_r, kind, alpha, impl):
    return tuple(h.new_empty(h.shape[0], dtype=compute_dtype(h.dtype)) for _ in range(5))


@torch.library.custom_op("dph::linear_f_divergence_backward", mutates_args=())
def linear_f_divergence_backward_op(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                    rh: torch.Tensor, rweight: torch.Tensor, rbias: torch.Tensor | None,
                                    valid: torch.Tensor, div: torch.Tensor, s0: torch.Tensor, s1: torch.Tensor,
                                    s2: torch.Tensor, s3: torch.Tensor, g: torch.Tensor, pre: float,
                                    post: float | None, pre_r: float, post_r: float | None, kind: str, alpha: float,
                                    impl: str, need_ref: bool) -> list[torch.Tensor]:
    """[dh, dW, db, drh, drW, drb], empty tensors where there is no gradient."""
    stats = (s0, s1, s2) if impl == "triton" else (s0, s1, s2, s3)
    grads = fdiv_backward(h, weight, bias, rh, rweight, rbias, valid, div, stats, g, (pre, post, pre_r, post_r),
                          kind, alpha, impl, None, need_ref)
    return [h.new_empty(0) if x is None else x for x in grads]


@linear_f_divergence_backward_op.register_fake
def _(h, weight, bias, rh, rweight, rbias, valid, div, s0, s1, s2, s3, g, pre, post, pre_r, post_r, kind, alpha,
      impl, need_ref):
    empty = h.new_empty(0)
    like = [h, weight, bias, rh, rweight, rbias]
    return [empty if x is None or (i >= 3 and not need_ref) else torch.empty_like(x) for i, x in enumerate(like)]


def _fdiv_op_setup(ctx, inputs, output):
    h, weight, bias, rh, rweight, rbias, valid, pre, post, pre_r, post_r, kind, alpha, impl = inputs
    ctx.save_for_backward(h, weight, bias, rh, rweight, rbias, valid, *output)
    ctx.args = (pre, post, pre_r, post_r, kind, alpha, impl)


def _fdiv_op_backward(ctx, g, *_):
    h, weight, bias, rh, rweight, rbias, valid, div, s0, s1, s2, s3 = ctx.saved_tensors
    need_ref = any(ctx.needs_input_grad[3:6])
    grads = linear_f_divergence_backward_op(h, weight, bias, rh, rweight, rbias, valid, div, s0, s1, s2, s3, g,
                                            *ctx.args, need_ref)
    out = [x if need and x.numel() else None for x, need in zip(grads, ctx.needs_input_grad[:6])]
    return (*out, *([None] * 8))


linear_f_divergence_op.register_autograd(_fdiv_op_backward, setup_context=_fdiv_op_setup)
