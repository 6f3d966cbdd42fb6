"""Vocab-parallel heads: the per-row statistics that the kernel families all-reduce, written once.

Layout (Megatron's): the P ranks of a process group each hold a contiguous, equal shard of the lm_head: rank r holds
global rows [r * V_shard, (r + 1) * V_shard) of the (V, D) weight (and of the bias), every rank the full hidden
states and the global targets. When P does not divide V the last shard is padded to V_shard rows (`shard_rows`
pads with zeros) and `vocab_size=V` says where the vocabulary ends: padded rows are left out of every softmax and get
a zero gradient. Without vocab_size all P * V_shard rows are vocabulary.

What crosses ranks is O(N) per call, never logits: one max all-reduce (each row's reference point, packed with the
shard sizes so that a mismatched layout fails on every rank at once) and one sum all-reduce (sum-exp, first moment,
target logit; the divergence adds one more for its two partial sums). Backward all-reduces the hidden-state gradient
(N x D): each rank's dh covers its own vocabulary rows only, and the sum is the complete gradient, so hidden.grad on
every rank equals the one-process gradient - what Megatron's column-parallel lm_head does with its input gradient
when it is fused with the vocab-parallel cross entropy. Do not all-reduce hidden.grad again.
The outputs (log-probs, entropy, divergence) are replicated: every rank computes the same loss from them, and the
all-reduce passes the (identical) upstream gradient through unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# A target id no vocabulary column has: another shard's token contributes no target term on this rank.
OUTSIDE = 2**31 - 1


@dataclass(frozen=True)
class VocabShard:
    group: object  # torch.distributed.ProcessGroup
    rank: int
    world: int
    rows: int  # V_shard: this rank's weight rows, padding included (equal on every rank)
    vocab_size: int  # V, the global vocabulary

    @property
    def start(self) -> int:
        return self.rank * self.rows

    @property
    def real(self) -> int:
        """Rows of this shard inside the vocabulary (V_shard except on a padded last shard; may be 0)."""
        return max(0, min(self.rows, self.vocab_size - self.start))


def vocab_shard(process_group, weight, vocab_size=None, name="weight"):
    """The VocabShard of a (V_shard, D) weight on this rank of process_group (None: no vocab parallelism)."""
    if process_group is None:
        if vocab_size is not None:
            raise ValueError("vocab_size is only used with process_group (a vocab-parallel head)")
        return None
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("process_group given but torch.distributed is not initialized (init_process_group first)")
    from ._checks import check_tensor
    check_tensor(name, weight, ndim=2)
    rank, world = dist.get_rank(process_group), dist.get_world_size(process_group)
    if rank < 0:
        raise ValueError("process_group does not contain this rank")
    rows = weight.shape[0]
    total = world * rows
    if vocab_size is None:
        vocab_size = total
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not (total - rows < vocab_size <= total):
        raise ValueError(f"vocab_size must be an int in ({total - rows}, {total}] for {world} shards of {rows} rows "
                         f"({name}), got {vocab_size!r}")
    return VocabShard(process_group, rank, world, rows, vocab_size)


def shard_rows(full, rank, world_size, vocab_size=None):
    """Rank `rank`'s contiguous shard of a (V, ...) tensor split over world_size ranks: ceil(V / world_size) rows,
    the last shard zero-padded to that size. A helper for building vocab-parallel heads from a full one."""
    V = full.shape[0] if vocab_size is None else vocab_size
    rows = -(-V // world_size)
    part = full[rank * rows: min(V, (rank + 1) * rows)]
    if part.shape[0] == rows:
        return part
    pad = full.new_zeros((rows - part.shape[0],) + tuple(full.shape[1:]))
    return torch.cat([part, pad])


def local_targets(shard, targets, valid):
    """This shard's column of each (safe, global) target, OUTSIDE where the token lives on another shard or the
    position is ignored."""
    local = targets - shard.start
    mine = valid & (local >= 0) & (local < shard.real)
    return torch.where(mine, local, torch.full_like(local, OUTSIDE)), mine


def all_reduce_max(shard, x):
    """Elementwise max over the group, packed with each rank's (rows, vocab_size) so that every rank checks that the
    shards agree (all raise together, none hangs)."""
    import torch.distributed as dist
    layout = torch.tensor([shard.rows, -shard.rows, shard.vocab_size, -shard.vocab_size], dtype=x.dtype,
                          device=x.device)
    buf = torch.cat([x.reshape(-1), layout])
    dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=shard.group)
    got = buf[-4:].tolist()
    if got[0] != -got[1] or got[2] != -got[3]:
        raise ValueError(f"vocab-parallel shards disagree across the group: weight rows from {-got[1]:.0f} to "
                         f"{got[0]:.0f}, vocab_size from {-got[3]:.0f} to {got[2]:.0f}; every rank must hold an "
                         f"equal shard (pad the last one, see dph_kernels.distributed.shard_rows)")
    return buf[:-4].reshape(x.shape)


def all_reduce_sum(shard, *xs):
    """Sums over the group of tensors of one dtype, in one all-reduce."""
    import torch.distributed as dist
    buf = torch.cat([x.reshape(-1) for x in xs])
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=shard.group)
    out, i = [], 0
    for x in xs:
        out.append(buf[i:i + x.numel()].reshape(x.shape))
        i += x.numel()
    return out


def merge_softmax(shard, shift, total, moment=None, target=None, mine=None):
    """Whole-vocabulary softmax statistics from each shard's, per row (any shape, elementwise):
    shift: a reference point of the shard's logits (its max, or its log-sum-exp);  total = sum_v exp(z_v - shift);
    moment = sum_v exp(z_v - shift) (z_v - shift) or None;  target = z_y - shift, read where `mine` (the rows whose
    token y lives on this shard), or None. Returns the same four, now over the whole vocabulary and relative to M = the largest shift
    of the group, so that log p_y = target - log(total), H = log(total) - moment / total, lse = M + log(total).
    A shard with no vocabulary rows passes total = 0 (its shift may be -inf)."""
    M = all_reduce_max(shard, shift)
    scale = torch.exp(shift - M)
    live = scale > 0  # an empty shard, or one whose logits are all ~1e-38 of the largest: it adds nothing
    zero = torch.zeros((), dtype=total.dtype, device=total.device)
    parts = [torch.where(live, scale * total, zero)]
    if moment is not None:  # re-centred on M: sum exp(z - M) (z - M) = scale * (moment + (shift - M) * total)
        parts.append(torch.where(live, scale * (moment + (shift - M) * total), zero))
    if target is not None:
        parts.append(torch.where(mine, target + (shift - M), zero))
    sums = all_reduce_sum(shard, *parts)
    total = sums[0]
    moment = sums[1] if moment is not None else None
    target = sums[-1] if target is not None else None
    return M, total, moment, target


def pad_rows(grad, like):
    """A shard's gradient over its vocabulary rows (or None for none), zero-padded to like's rows."""
    if grad is not None and grad.shape[0] == like.shape[0]:
        return grad
    out = torch.zeros(like.shape, dtype=like.dtype, device=like.device)
    if grad is not None:
        out[:grad.shape[0]] = grad
    return out


def merge_lse(shard, *lse):
    """Whole-vocabulary log-sum-exps from each shard's (-inf for a shard with no vocabulary rows)."""
    x = torch.stack(lse)
    M, total, _, _ = merge_softmax(shard, x, torch.ones_like(x))
    return (M + total.log()).unbind(0)
