"""Fused linear log-prob: per-token log pi(y_t) and entropy straight from hidden states and the lm_head weight.

    z      = (h @ W.T + b) / T                      (never stored: [N, V])
    lse    = logsumexp(z)                           (saved per row; the torch path keeps it as shift + log(sum))
    logp   = z[y] - lse
    H      = lse - S,   S = sum_v p_v z_v           (S saved when the entropy is asked for)

Backward, for upstream gradients g_l (on logp) and g_H (on H), per logit:
    dz_v   = g_l * (1[v=y] - p_v)  -  g_H * p_v * (z_v - S)
    dlogit = dz / T;   dh = dlogit @ W;   dW = dlogit.T @ h;   db = sum_rows dlogit

Two implementations share that math:
* tiled torch (CPU and anywhere): [row block, vocab chunk] tiles of TILE_BYTES. Forward sums exp(z - shift) over
  the chunks with a fixed per-row shift (see _block_sums); backward recomputes each tile's logits (a fourth matmul)
  rather than keeping [N, V] alive between forward and backward, and folds the upstream gradient into h so that a
  tile costs one exp pass. The fused loss (fused.py) uses the row-chunk helpers below instead: it knows its upstream
  gradient during the forward pass, so it needs no recompute.
* Triton (CUDA; also runs under TRITON_INTERPRET=1): forward streams vocab tiles with an online max / sum-exp /
  sum p*z, split over vocab ranges for occupancy and merged in torch; backward goes over vocabulary chunks: a Triton
  kernel writes each chunk's dlogits once, cuBLAS does dW[chunk] = dz.T @ h and dh += dz @ W[chunk] (no atomics,
  bitwise repeatable; the design and its reasoning: linear_logprob_triton.py).
Both paths see only the rows that carry a loss: LinearLogprobFunction compacts ignored positions away before any
matmul and scatters the outputs (0) and dh (0) back (rows_with_loss).
"""
from __future__ import annotations

import torch

from . import _checks
from .reference import head_factors
from .reference import linear_logprob as _reference_linear_logprob

# Budget for the row-chunk helpers' [rows, V] work buffer, used by the fused loss's torch path (one fp32 buffer plus
# at most two of the same size while the entropy is on). Measured on 2 CPU cores at N=4096, D=512, V=32768,
# forward+backward: 16 MiB chunks take 1.35x the time of 64 MiB ones, 32 MiB 1.1x, 128 MiB no less; 32 MiB keeps the
# peak extra memory of the fused loss under 15% of the materializing eager code's (64 MiB: 17.5%).
CHUNK_BYTES = 32 * 2**20

# linear_logprob's own torch path works in [row block, vocab chunk] tiles of TILE_BYTES (see tiles()): 8 MiB stays in
# a CPU's last-level cache between the matmul that writes a tile and the passes that read it, and a few thousand rows
# per tile keep the matmuls as fast as one big one (2 cores, N=4096, D=512, V=32768: 0.78-0.88 s per matmul in
# 512-4096-column chunks vs 0.94 s unchunked and 1.17 s in 256-row chunks).
TILE_BYTES = 8 * 2**20
MIN_TILE_COLS = 512


def _chunk_rows(V: int, itemsize: int = 4) -> int:
    return max(1, CHUNK_BYTES // (V * itemsize))


# --------------------------------------------------------------------------------------------------------------------
# Chunked torch
# --------------------------------------------------------------------------------------------------------------------


def chunk_stats_(z, targets, with_entropy):
    """(target logit, lse, S = sum_v p_v z_v or None, e_scale) of a chunk's logits z. Without the entropy z is
    overwritten with e = exp(z - max), P = e * e_scale, which is all chunk_dlogits_ needs (no second [rows, V]
    buffer, no second exp); with it z is left as is and e_scale is None."""
    z_target = z.gather(1, targets[:, None]).squeeze(1)
    m = z.amax(1, keepdim=True)
    if not with_entropy:
        s = z.sub_(m).exp_().sum(1)
        return z_target, m.squeeze(1) + s.log(), None, 1.0 / s
    zc = z - m
    e = torch.exp(zc)
    s = e.sum(1)
    # sum_v p_v z_v = max + sum_v e_v (z_v - max) / s: centred, so no cancellation against a large max
    m = m.squeeze(1)
    return z_target, m + s.log(), m + torch.linalg.vecdot(e, zc) / s, None


def chunk_dlogits_(z, targets, lse, S, e_scale, g_logp, g_ent, inv_temp):
    """Overwrite a chunk's buffer z (as chunk_stats_ left it) with d loss / d raw logits for per-row upstream
    gradients g_logp (on logp) and g_ent (on the entropy, or None): dz = g_l (onehot - p) - g_H p (z - S), times 1/T.
    Returns dz (z's buffer, or a new one when the entropy has a gradient)."""
    gl = g_logp[:, None] * inv_temp  # the 1/T of dlogit = dz / T folded into the per-row factors
    if e_scale is not None:  # z holds e = P / e_scale
        assert g_ent is None, "an entropy gradient needs chunk_stats_(..., with_entropy=True)"
        z.mul_(-gl * e_scale[:, None])
    elif g_ent is not None:  # dz = g_l onehot - Q, Q = P (g_l + g_H (H + log P)), log P = z - lse, H = lse - S
        a = (g_logp + g_ent * (lse - S))[:, None]
        z = softmax_weights_(z.sub_(lse[:, None]), a, g_ent[:, None]).mul_(-inv_temp)
    else:
        z.sub_(lse[:, None]).exp_().mul_(-gl)  # -g_l * p, in place
    return z.scatter_add_(1, targets[:, None], gl)  # + g_l * onehot


def softmax_weights_(log_e, a, b):
    """Q = exp(log_e) * (a + b * log_e) for per-row a, b of shape (rows, 1): what the log-prob and entropy terms put
    on every vocabulary entry of the logits' gradient (see torch_backward). log_e is overwritten; Q is a new buffer."""
    q = torch.exp(log_e)
    return q.mul_(log_e.mul_(b).add_(a))


def chunk_accumulate_grads(dz, hc, valid, weight, dh_out, dW, db):
    """dh_out = dz @ W;  dW += dz.T @ h;  db += sum dz (fp32 accumulators). Ignored rows contribute nothing, even
    when their hidden state is NaN/inf (0 * NaN is NaN): their dlogit rows and h rows are zeroed first."""
    rows_valid = valid[:, None]
    if not bool(rows_valid.all()):
        dz.masked_fill_(~rows_valid, 0.0)
        hc = torch.where(rows_valid, hc, 0.0)
    dh_out.copy_(dz.to(hc.dtype) @ weight)
    dW.addmm_(dz.T, hc.to(dW.dtype))
    if db is not None:
        db += dz.sum(0)


def chunks(N, V, dtype):
    """Row ranges whose [rows, V] buffer fits CHUNK_BYTES."""
    step = _chunk_rows(V, torch.finfo(dtype).bits // 8)
    return [slice(r0, min(N, r0 + step)) for r0 in range(0, N, step)]


def compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def grad_buffers(weight, bias, cdt):
    dW = torch.zeros(weight.shape, dtype=cdt, device=weight.device)
    db = torch.zeros(weight.shape[0], dtype=cdt, device=weight.device) if bias is not None else None
    return dW, db


def tiles(N, V, itemsize, tile_bytes=None):
    """(row blocks, vocab chunks) of the tiled torch paths: a [rows, cols] tile fits tile_bytes (default TILE_BYTES),
    with as many rows as allow cols >= MIN_TILE_COLS (one row block up to a few thousand tokens, so each vocab
    chunk's dW slice is written once)."""
    budget = max(1, (tile_bytes or TILE_BYTES) // itemsize)
    rows = min(N, max(1, budget // MIN_TILE_COLS))
    cols = min(V, max(1, budget // rows))
    return ([slice(r, min(N, r + rows)) for r in range(0, N, rows)],
            [slice(v, min(V, v + cols)) for v in range(0, V, cols)])


def _tile_logits(h, weight, bias, vc, inv_temp, cdt, neg_shift=None, post=None):
    """z - shift for one tile, in cdt (fp32 / fp64), z = (h @ W[vc].T + b[vc]) * inv_temp, or with a softcap
    post * tanh(inv_temp * (h @ W[vc].T + b[vc])) (reference.head_factors: inv_temp is its `pre`); neg_shift is
    (rows, 1) or None."""
    if post is not None:
        z = h @ weight[vc].T
        if bias is not None:
            z += bias[vc]
        z = torch.tanh_(z.to(cdt).mul_(inv_temp)).mul_(post)
        return z if neg_shift is None else z.add_(neg_shift)
    if weight.dtype != cdt:  # bf16 / fp16: the product in the input dtype, the rest in fp32
        z = h @ weight[vc].T
        if bias is not None:
            z += bias[vc]
        z = z.to(cdt)
        if inv_temp != 1.0:
            z.mul_(inv_temp)
        return z if neg_shift is None else z.add_(neg_shift)
    if bias is None:
        z = h @ weight[vc].T
        if inv_temp != 1.0:
            z.mul_(inv_temp)
    else:
        z = torch.addmm(bias[vc] * inv_temp, h, weight[vc].T, alpha=inv_temp)
    # The shift goes on after z is rounded, in every pass: the forward's first chunk takes its shift from z itself,
    # and an addmm fused with the shift would round z - shift instead, so backward's exp(z - shift) of the largest
    # logit would drift from the forward's exact 1 by up to half an ulp of z (1e-5 relative at |z| ~ 200).
    return z if neg_shift is None else z.add_(neg_shift)


def _block_sums(hb, tb, weight, bias, vocab_chunks, inv_temp, cdt, with_entropy, shift=None, post=None):
    """One row block's pass over the vocabulary with y = z - shift: returns shift, sum_v exp(y), sum_v exp(y) y (or
    None) and y at the target. shift defaults to the first chunk's row max: a logit of the row, so the sum is >= 1
    (no underflow) and no running max or rescaling is needed; a later logit above shift + ~88 overflows the fp32 sum
    to inf, which the caller detects."""
    rows = hb.shape[0]
    total = torch.zeros(rows, dtype=cdt, device=hb.device)
    moment = torch.zeros(rows, dtype=cdt, device=hb.device) if with_entropy else None
    y_target = torch.zeros(rows, dtype=cdt, device=hb.device)
    neg_shift = None if shift is None else -shift[:, None]
    for vc in vocab_chunks:
        y = _tile_logits(hb, weight, bias, vc, inv_temp, cdt, neg_shift, post)
        if neg_shift is None:
            shift = y.amax(1)
            neg_shift = -shift[:, None]
            y.add_(neg_shift)
        local = tb - vc.start
        inside = (local >= 0) & (local < y.shape[1])
        y_target += torch.where(inside, y.gather(1, local.clamp(0, y.shape[1] - 1)[:, None]).squeeze(1), 0.0)
        if with_entropy:
            e = torch.exp(y)
            moment += torch.linalg.vecdot(e, y)
            total += e.sum(1)
            del e
        else:
            total += y.exp_().sum(1)
        del y  # freed before the next tile is allocated
    return shift, total, moment, y_target


def torch_forward_sums(h, weight, bias, targets, inv_temp, with_entropy, post=None):
    """h (N, D), targets (N,) safe (a target >= V, another shard's token, adds no target term). Per row: shift,
    total = sum_v exp(z_v - shift), moment = sum_v exp(z_v - shift) (z_v - shift) (or None) and z_y - shift (0 when
    y >= V). The shift and the sum are kept apart rather than merged into one rounded lse so that backward's
    P = exp(z - shift) / total stays exact to the last bit even for large logits.

    Per row block one pass over the vocabulary chunks (_block_sums); rows whose sum overflowed are redone with their
    true max as the shift (an extra pass over their logits)."""
    N, V = h.shape[0], weight.shape[0]
    cdt = compute_dtype(h.dtype)
    shift, total, y_target = (torch.empty(N, dtype=cdt, device=h.device) for _ in range(3))
    moment = torch.empty(N, dtype=cdt, device=h.device) if with_entropy else None
    row_blocks, vocab_chunks = tiles(N, V, torch.finfo(cdt).bits // 8)
    for rb in row_blocks:
        hb, tb = h[rb], targets[rb]
        sums = _block_sums(hb, tb, weight, bias, vocab_chunks, inv_temp, cdt, with_entropy, post=post)
        over = torch.isposinf(sums[1]).nonzero().squeeze(1)
        if over.numel():
            true_max = torch.stack([_tile_logits(hb[over], weight, bias, vc, inv_temp, cdt, post=post).amax(1)
                                    for vc in vocab_chunks]).amax(0)
            redone = _block_sums(hb[over], tb[over], weight, bias, vocab_chunks, inv_temp, cdt, with_entropy,
                                 true_max, post)
            for mine, fixed in zip(sums, redone):
                if mine is not None:
                    mine[over] = fixed
        shift[rb], total[rb], y_target[rb] = sums[0], sums[1], sums[3]
        if with_entropy:
            moment[rb] = sums[2]
    return shift, total, moment, y_target


def finish_forward(total, moment, y_target, valid):
    """logp = z_y - lse and H = lse - sum p z from the sums (all relative to one shift per row); 0 where ignored."""
    zero = torch.zeros((), dtype=total.dtype, device=total.device)
    log_total = total.log()
    logp = torch.where(valid, y_target - log_total, zero)
    entropy = None if moment is None else torch.where(valid, log_total - moment / total, zero)
    return logp, entropy


def torch_forward(h, weight, bias, targets, valid, inv_temp, with_entropy, post=None):
    """Returns logp, entropy (or None) and what backward needs: the per-row (shift, total)."""
    shift, total, moment, y_target = torch_forward_sums(h, weight, bias, targets, inv_temp, with_entropy, post)
    return (*finish_forward(total, moment, y_target, valid), (shift, total))


def torch_backward(h, weight, bias, targets, valid, shift, total, entropy, g_logp, g_ent, inv_temp, post=None,
                   dh_fp32=False):
    """Gradients of sum(g_logp * logp + g_ent * H) with respect to h, weight, bias (fp32 accumulation); recomputes
    each tile's logits, shifted as in the forward pass: e = exp(z - shift), P = e / total.

    With Q = P * (g_l + g_H (H + log P)) (the dz formula above, regrouped), the gradient of the raw logits is
    (g_l onehot - Q) / T:
        dW = (scatter of g_l h at the targets - Q.T @ h) / T,   dh = (g_l W[y] - Q @ W) / T,   db likewise.
    Q = e * (a + b (z - shift)) with per-row a, b; without the entropy b = 0 and a is folded into h (and into dh after
    the loop) rather than into the tile, which saves an elementwise pass over it. With a softcap (post set) the
    logits' gradient is that of z times d z / d a (reference.head_slope), a tile of its own: _capped_backward."""
    N, D = h.shape
    V = weight.shape[0]
    cdt = shift.dtype
    zero = torch.zeros((), dtype=cdt, device=h.device)
    g_l = torch.where(valid, g_logp.to(cdt), zero)
    h_safe = h
    if not bool(valid.all()):
        # Ignored rows may hold NaN/inf (0 * NaN is NaN): zero hidden states, and a huge shift makes their e rows 0.
        h_safe = torch.where(valid[:, None], h, 0.0)
        shift = torch.where(valid, shift, 1e30)
        total = torch.where(valid, total, 1.0)
    dh_dtype = torch.promote_types(h.dtype, torch.float32) if dh_fp32 else h.dtype
    if post is not None:
        return _capped_backward(h, h_safe, weight, bias, targets, valid, shift, total, entropy, g_l, g_ent,
                                inv_temp, post, dh_dtype)
    dh = torch.empty(h.shape, dtype=dh_dtype, device=h.device)
    dW, db = grad_buffers(weight, bias, cdt)
    wide = weight.dtype != cdt  # bf16 / fp16: the tile's products with W are done in fp32
    row_blocks, vocab_chunks = tiles(N, V, torch.finfo(cdt).bits // 8)
    for rb in row_blocks:
        hb, gl_b, total_b = h_safe[rb], g_l[rb], total[rb]
        neg_shift = -shift[rb, None]
        if g_ent is None:
            row_scale = gl_b / total_b  # Q = row_scale * e
            left = hb.to(cdt) * (row_scale * inv_temp)[:, None]
        else:
            gH = torch.where(valid[rb], g_ent[rb].to(cdt), zero)
            H_b = torch.where(valid[rb], entropy[rb], zero)
            a = ((gl_b + gH * (H_b - total_b.log())) / total_b)[:, None]
            b = (gH / total_b)[:, None]
            left = hb.to(cdt) * inv_temp
        QW = torch.zeros(hb.shape, dtype=cdt, device=h.device)  # sum over chunks of Q @ W (of e @ W without H)
        for vc in vocab_chunks:
            y = _tile_logits(hb, weight, bias, vc, inv_temp, cdt, neg_shift)
            Q = y.exp_() if g_ent is None else softmax_weights_(y, a, b)
            w_c = weight[vc].to(cdt) if wide else weight[vc]
            QW.addmm_(Q, w_c)
            dW[vc].addmm_(Q.T, left, alpha=-1.0)
            if db is not None:
                db[vc] -= Q.sum(0) * inv_temp if g_ent is not None else Q.T @ (row_scale * inv_temp)
            del Q, y  # freed before the next tile is allocated
        tb = targets[rb]
        if g_ent is None:
            QW.mul_(row_scale[:, None])
        mine = tb < V  # a target on another vocabulary shard has no target term here
        if not bool(mine.all()):
            gl_b, tb = torch.where(mine, gl_b, zero), torch.where(mine, tb, 0)
        dh_b = (weight[tb].to(cdt) * gl_b[:, None]).sub_(QW).mul_(inv_temp)
        dh[rb] = dh_b.to(dh_dtype)
        dW.index_add_(0, tb, hb.to(cdt) * (gl_b * inv_temp)[:, None])
        if db is not None:
            db.index_add_(0, tb, gl_b * inv_temp)
    return dh, dW.to(weight.dtype), None if db is None else db.to(bias.dtype)


def _capped_backward(h, h_safe, weight, bias, targets, valid, shift, total, entropy, g_l, g_ent, pre, post,
                     dh_dtype):
    """torch_backward for a softcapped head: per tile G = (Q - g_l onehot) * dz/da = -dlogit, then dh = -G @ W,
    dW = -G.T @ h, db = -sum G (the target term cannot be folded out of the tile: it is scaled by the slope there)."""
    from .reference import head_slope
    N, D = h.shape
    V = weight.shape[0]
    cdt = shift.dtype
    zero = torch.zeros((), dtype=cdt, device=h.device)
    dh = torch.empty(h.shape, dtype=dh_dtype, device=h.device)
    dW, db = grad_buffers(weight, bias, cdt)
    wide = weight.dtype != cdt
    row_blocks, vocab_chunks = tiles(N, V, torch.finfo(cdt).bits // 8)
    for rb in row_blocks:
        hb, gl_b, total_b, tb = h_safe[rb], g_l[rb], total[rb], targets[rb]
        if g_ent is None:
            a, b = (gl_b / total_b)[:, None], None
        else:
            gH = torch.where(valid[rb], g_ent[rb].to(cdt), zero)
            H_b = torch.where(valid[rb], entropy[rb], zero)
            a = ((gl_b + gH * (H_b - total_b.log())) / total_b)[:, None]
            b = (gH / total_b)[:, None]
        hb_c = hb.to(cdt)
        GW = torch.zeros(hb.shape, dtype=cdt, device=h.device)
        for vc in vocab_chunks:
            y = _tile_logits(hb, weight, bias, vc, pre, cdt, -shift[rb, None], post)
            slope = head_slope(y + shift[rb, None], pre, post)
            G = y.exp_().mul_(a) if b is None else softmax_weights_(y, a, b)
            local = tb - vc.start
            inside = (local >= 0) & (local < G.shape[1])
            G.scatter_add_(1, local.clamp(0, G.shape[1] - 1)[:, None], torch.where(inside, -gl_b, zero)[:, None])
            G.mul_(slope)
            GW.addmm_(G, weight[vc].to(cdt) if wide else weight[vc])
            dW[vc].addmm_(G.T, hb_c, alpha=-1.0)
            if db is not None:
                db[vc] -= G.sum(0)
            del G, y, slope  # freed before the next tile is allocated
        dh[rb] = GW.neg_().to(dh_dtype)
    return dh, dW.to(weight.dtype), None if db is None else db.to(bias.dtype)


# --------------------------------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------------------------------


def logprob_forward(h, weight, bias, targets, valid, inv_temp, with_entropy, impl, post=None, shard=None):
    """Rows as given (no compaction): (logp, entropy or None, stats, targets as backward wants them). stats is what
    logprob_backward needs per row: (shift, total) on the torch path, (lse, S or None) on the Triton one."""
    w, b, mine = weight, bias, None
    if shard is not None:
        from .distributed import local_targets
        targets, mine = local_targets(shard, targets, valid)
        w, b = weight[:shard.real], None if bias is None else bias[:shard.real]  # padding rows left out
    if w.shape[0] == 0:  # a shard wholly past the vocabulary: no logits, nothing to add
        cdt = compute_dtype(h.dtype)
        nothing = torch.zeros(h.shape[0], dtype=cdt, device=h.device)
        sums = (torch.full_like(nothing, float("-inf")), nothing, nothing if with_entropy else None, nothing)
    elif impl == "triton":
        from . import linear_logprob_triton as tk
        lse, S, zt = tk.forward_stats(h, w, b, targets, valid, inv_temp, with_entropy, post)
        sums = (lse, torch.ones_like(lse), None if S is None else S - lse, zt - lse)
    else:
        sums = torch_forward_sums(h, w, b, targets, inv_temp, with_entropy, post)
    if shard is not None:
        from .distributed import merge_softmax
        sums = merge_softmax(shard, *sums, mine=mine)
    shift, total, moment, y_target = sums
    logp, entropy = finish_forward(total, moment, y_target, valid)
    if impl != "triton":
        stats = (shift, total)
    elif shard is None:
        stats = (lse, S)
    else:
        stats = (shift + total.log(), None if moment is None else shift + moment / total)
    return logp, entropy, stats, targets


def logprob_backward(h, weight, bias, targets, valid, entropy, stats, g_logp, g_ent, inv_temp, impl, post=None,
                     shard=None, need_weight_grad=True, chunk_cols=None):
    """Gradients (dh, dW or None, db or None) of the rows logprob_forward saw; with a shard dh is summed over the
    group and dW / db are padded back to the shard's rows."""
    if g_logp is None:
        g_logp = torch.zeros(h.shape[0], dtype=stats[0].dtype, device=h.device)
    w, b = weight, bias
    if shard is not None:
        w, b = weight[:shard.real], None if bias is None else bias[:shard.real]
    if w.shape[0] == 0:
        dh, dW, db = torch.zeros(h.shape, dtype=torch.float32, device=h.device), None, None
    elif impl == "triton":
        from . import linear_logprob_triton as tk
        dh, dW, db = tk.backward(h, w, b, targets, valid, *stats, g_logp, g_ent, inv_temp,
                                 need_weight_grad=need_weight_grad, post=post, dh_fp32=shard is not None,
                                 chunk_cols=chunk_cols)
    else:
        dh, dW, db = torch_backward(h, w, b, targets, valid, *stats, entropy, g_logp, g_ent, inv_temp, post,
                                    dh_fp32=shard is not None)
    if shard is not None:
        from .distributed import all_reduce_sum, pad_rows
        dh = all_reduce_sum(shard, dh)[0].to(h.dtype)
        dW = pad_rows(dW, weight) if need_weight_grad else None
        db = None if bias is None else pad_rows(db, bias)
    return dh, dW if need_weight_grad else None, db


class LinearLogprobFunction(torch.autograd.Function):
    """Inputs are flat: h (N, D), weight (V, D), bias (V,) or None, targets (N,) safe, valid (N,) bool. With a
    VocabShard (distributed.py) weight and bias are this rank's shard, targets global; the outputs are the
    whole-vocabulary ones and dh is summed over the group. Rows without loss are compacted away first."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, valid, inv_temp, with_entropy, impl, post=None, shard=None,
                chunk_cols=None):
        (rows, ctx.any_loss), n_all = rows_with_loss(valid), h.shape[0]
        h_all = h
        if rows is not None:  # rows without loss never enter a matmul (their outputs are 0, their gradients 0)
            h, targets, valid = h.index_select(0, rows), targets[rows], valid[rows]
        logp, entropy, stats, targets = logprob_forward(h, weight, bias, targets, valid, inv_temp, with_entropy,
                                                        impl, post, shard)
        # h is saved whole (the caller's tensor, no copy held): backward gathers its rows again.
        ctx.save_for_backward(h_all, weight, bias, targets, valid, entropy, rows, *stats)
        ctx.inv_temp, ctx.impl, ctx.post, ctx.shard, ctx.chunk_cols = inv_temp, impl, post, shard, chunk_cols
        if rows is not None:
            logp = scatter_rows(logp, rows, n_all)
            entropy = None if entropy is None else scatter_rows(entropy, rows, n_all)
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        h_all, weight, bias, targets, valid, entropy, rows, *stats = ctx.saved_tensors
        if not ctx.any_loss:  # every row ignored (the same on every rank of a group): nothing to compute
            return (torch.zeros_like(h_all), torch.zeros_like(weight) if ctx.needs_input_grad[1] else None,
                    None if bias is None else torch.zeros_like(bias), *([None] * 8))
        h = h_all if rows is None else h_all.index_select(0, rows)
        if rows is not None:
            g_logp = None if g_logp is None else g_logp[rows]
            g_ent = None if g_ent is None else g_ent[rows]
        dh, dW, db = logprob_backward(h, weight, bias, targets, valid, entropy, stats, g_logp, g_ent, ctx.inv_temp,
                                      ctx.impl, ctx.post, ctx.shard, ctx.needs_input_grad[1], ctx.chunk_cols)
        if rows is not None:
            dh = scatter_rows(dh, rows, h_all.shape[0])
        return dh, dW, db, None, None, None, None, None, None, None, None


def rows_with_loss(valid):
    """(rows, any): rows = the indices of the rows that carry a loss when some but not all do, else None; any =
    whether any row does. The ops compact their inputs to these rows before any matmul, so prompt, padding and
    ignore_index positions cost nothing. With no valid row nothing is compacted: the forward zeroes such rows itself
    (and still joins a vocab-parallel group's collectives, which every rank reaches with the same mask) and the
    backward returns zeros."""
    rows = valid.nonzero().squeeze(1)  # one sync (the count), as the range check already has
    if rows.numel() in (0, valid.numel()):
        return None, rows.numel() > 0
    return rows, True


def scatter_rows(x, rows, n, fill=0.0):
    """x (len(rows), ...) written at `rows` of a new (n, ...) tensor of `fill` (indices unique: a plain copy)."""
    out = torch.full((n, *x.shape[1:]), fill, dtype=x.dtype, device=x.device)
    return out.index_copy_(0, rows, x)


# --------------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------------


def flat_linear_inputs(hidden, weight, targets, ignore_index):
    """Checked inputs as the Functions take them: flat contiguous h (N, D), weight, safe targets (ignored -> 0) and
    the valid mask."""
    D = hidden.shape[-1]
    h = hidden.reshape(-1, D)
    if not h.is_contiguous():
        h = h.contiguous()
    w = weight if weight.is_contiguous() else weight.contiguous()
    t = targets.reshape(-1)
    valid = t != ignore_index
    return h, w, torch.where(valid, t, torch.zeros_like(t)).long(), valid


def logprob_core(hidden, weight, targets, bias, pre, post, ignore_index, return_entropy, impl, shard=None,
                 chunk_cols=None):
    """linear_logprob after its checks (also the fused loss's entry): (logp, entropy or None) of targets' shape."""
    h, w, safe_t, valid = flat_linear_inputs(hidden, weight, targets, ignore_index)
    if torch.compiler.is_compiling():  # one custom op: no graph break, no host sync (no row compaction)
        if shard is not None:
            raise NotImplementedError("process_group (vocab-parallel) is not supported under torch.compile")
        logp, entropy, _, _ = torch.ops.dph.linear_logprob(h, w, bias, safe_t, valid, pre, post, return_entropy,
                                                           impl)
        entropy = entropy if return_entropy else None
    else:
        logp, entropy = LinearLogprobFunction.apply(h, w, bias, safe_t, valid, pre, return_entropy, impl, post,
                                                    shard, chunk_cols)
    if hidden.dtype != torch.float64:
        logp = logp.float()
    lead = targets.shape
    return logp.reshape(lead), None if entropy is None else entropy.reshape(lead)


def linear_logprob(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100,
                   return_entropy=False, impl="auto", softcap=None, logit_scale=1.0, process_group=None,
                   vocab_size=None, chunk_cols=None):
    """Per-token log pi(target) (and entropy) of softmax(z), z = softcap(logit_scale * (hidden @ weight.T + bias))
    / temperature, softcap(x) = cap * tanh(x / cap).

    Args:
        hidden: (..., D) float32 / bfloat16 / float16 (float64 for impl="torch" / "reference").
        weight: (V, D), same dtype and device as hidden.
        targets: (...) integer, hidden's leading shape; values in [0, V) or ignore_index. targets[i] is the token
            that hidden[i] predicts: for a causal LM over ids x, hidden = states of x[:-1], targets = x[1:] (the
            next tokens, shifted by one).
        bias: optional (V,).
        temperature: > 0; applied in fp32 to the logits (and the bias).
        ignore_index: positions with this target give 0 and receive no gradient.
        return_entropy: also return the entropy of the distribution at each position.
        impl: "auto" (Triton on CUDA, chunked torch elsewhere) | "triton" | "torch" | "reference".
        softcap: None (off) or the cap c > 0 of Gemma-style final-logit softcapping (config.final_logit_softcapping,
            30.0 for Gemma 2). logit_scale: > 0, multiplies the logits first (Cohere's config.logit_scale).
            Order as in the models and trainers (reference.head_transform): scale, then cap, then temperature.
        process_group: a torch.distributed group over which the head is vocab-parallel (dph_kernels.distributed):
            weight (and bias) are this rank's contiguous shard of V_shard rows (rank r: global rows
            [r * V_shard, (r + 1) * V_shard)), hidden and targets (global ids) the same on every rank. The outputs
            are the whole-vocabulary ones on every rank; hidden's gradient is summed over the group inside backward
            (complete on every rank), weight's and bias's are this shard's. O(N) floats cross ranks, never logits.
        vocab_size: with process_group, the global V when the last shard is padded (default world * V_shard).
        chunk_cols: impl="triton" only: vocabulary columns per backward chunk (its [N, chunk_cols] dlogit buffer);
            default: as many as linear_logprob_triton.DLOGIT_CHUNK_BYTES (192 MiB) allows.

    Returns:
        fp32 tensor(s) of targets' shape: logp, or (logp, entropy). Differentiable w.r.t. hidden, weight and bias
        for any upstream gradient. A NaN/inf in one token's hidden state makes that token's outputs NaN and leaves
        the other tokens' outputs untouched (the weight gradient is NaN if such a token has a nonzero gradient, as
        the math says).
    """
    _checks.check_impl(impl)
    _checks.check_linear_inputs(hidden, weight, targets, bias, allow_fp64=True)
    impl = _checks.resolve_impl(impl, hidden.device)
    if impl == "triton" and hidden.dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"hidden has dtype {hidden.dtype}; impl='triton' supports float32, bfloat16, float16")
    if process_group is not None and impl == "reference":
        raise ValueError("process_group needs impl 'auto', 'torch' or 'triton' (the reference materializes one head)")
    temperature = _checks.check_temperature(temperature)
    softcap, logit_scale = _checks.check_head(softcap, logit_scale)
    from .distributed import vocab_shard
    shard = vocab_shard(process_group, weight, vocab_size)
    if not torch.compiler.is_compiling():  # a value check (a host sync): eager only
        _checks.check_targets_range(targets, weight.shape[0] if shard is None else shard.vocab_size, ignore_index)
    if impl == "reference":
        out = _reference_linear_logprob(hidden, weight, targets, bias, temperature, ignore_index, return_entropy,
                                        softcap, logit_scale)
        return tuple(o.float() for o in out) if return_entropy else out.float()
    logp, entropy = logprob_core(hidden, weight, targets, bias, *head_factors(softcap, logit_scale, temperature),
                                 ignore_index, return_entropy, impl, shard, chunk_cols)
    return (logp, entropy) if return_entropy else logp


# --------------------------------------------------------------------------------------------------------------------
# torch.compile / CUDA graphs: the same math as one custom op
# --------------------------------------------------------------------------------------------------------------------
# Under torch.compile the log-prob is one opaque node, a torch.library custom op with a fake (shape-only)
# implementation and a registered autograd whose backward is a second custom op: dynamo traces none of our Python
# loops or Triton launches and never breaks the graph. The op takes every row as it is (compacting rows needs a
# data-dependent count, a host sync) and no process_group.

@torch.library.custom_op("dph::linear_logprob", mutates_args=())
def linear_logprob_op(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                      valid: torch.Tensor, pre: float, post: float | None, with_entropy: bool,
                      impl: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, entropy (zeros without it), stat_a, stat_b) of flat inputs; the stats are logprob_forward's."""
    logp, entropy, (a, b), _ = logprob_forward(h, weight, bias, targets, valid, pre, with_entropy, impl, post)
    return (logp, torch.zeros_like(logp) if entropy is None else entropy, a.clone() if a is logp else a,
            torch.zeros_like(a) if b is None else b)


@linear_logprob_op.register_fake
def _(h, weight, bias, targets, valid, pre, post, with_entropy, impl):
    return tuple(h.new_empty(h.shape[0], dtype=compute_dtype(h.dtype)) for _ in range(4))


@torch.library.custom_op("dph::linear_logprob_backward", mutates_args=())
def linear_logprob_backward_op(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                               targets: torch.Tensor, valid: torch.Tensor, entropy: torch.Tensor,
                               stat_a: torch.Tensor, stat_b: torch.Tensor, g_logp: torch.Tensor,
                               g_ent: torch.Tensor | None, pre: float, post: float | None, impl: str,
                               with_entropy: bool, need_weight_grad: bool
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dh, dW (empty when not needed), db (empty without a bias))."""
    stats = (stat_a, stat_b if with_entropy or impl != "triton" else None)
    dh, dW, db = logprob_backward(h, weight, bias, targets, valid, entropy, stats, g_logp, g_ent, pre, impl, post,
                                  need_weight_grad=need_weight_grad)
    return dh, h.new_empty(0) if dW is None else dW, h.new_empty(0) if db is None else db


@linear_logprob_backward_op.register_fake
def _(h, weight, bias, targets, valid, entropy, stat_a, stat_b, g_logp, g_ent, pre, post, impl, with_entropy,
      need_weight_grad):
    return (torch.empty_like(h), torch.empty_like(weight) if need_weight_grad else h.new_empty(0),
            h.new_empty(0) if bias is None else torch.empty_like(bias))


def _logprob_op_setup(ctx, inputs, output):
    h, weight, bias, targets, valid, pre, post, with_entropy, impl = inputs
    ctx.save_for_backward(h, weight, bias, targets, valid, output[1], output[2], output[3])
    ctx.args = (pre, post, impl, with_entropy)


def _logprob_op_backward(ctx, g_logp, g_ent, _g_a, _g_b):
    h, weight, bias, targets, valid, entropy, a, b = ctx.saved_tensors
    pre, post, impl, with_entropy = ctx.args
    if g_logp is None:
        g_logp = torch.zeros_like(a)
    need_w = ctx.needs_input_grad[1]
    dh, dW, db = linear_logprob_backward_op(h, weight, bias, targets, valid, entropy, a, b, g_logp,
                                            g_ent if with_entropy else None, pre, post, impl, with_entropy, need_w)
    return dh, dW if need_w else None, None if bias is None else db, None, None, None, None, None, None


linear_logprob_op.register_autograd(_logprob_op_backward, setup_context=_logprob_op_setup)
