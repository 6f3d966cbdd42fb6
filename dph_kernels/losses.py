"""RL losses on per-token log-probs from any source (validated public wrappers around reference.py's math).

    loss, metrics = dk.ppo_clip_loss(logp, old_logp, advantages, mask, clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    g = dk.f_divergence(logp - ref_logp, "js")            # per-token generator f(u), u = pi_theta / pi_ref
    k = dk.kl_penalty(logp, ref_logp, estimator="k3")     # KL penalty (k3: a forward-KL gradient; k2: reverse)
    L = dk.aggregate(values, mask, "token-mean", normalizer=None)
    A = dk.grpo_advantages(rewards, group_size=16)

Gradient accumulation / data parallel: pass `normalizer` = the denominator of the whole step (for "token-mean" the
number of loss tokens over all micro-batches and ranks; for the "seq-mean-*" modes the number of rows, for
"seq-mean-token-sum-norm" rows x norm_length). Then summing the micro-batch losses (and all-reducing gradients
with SUM) gives exactly the gradients of one big batch.
"""
from __future__ import annotations

import torch

from . import _checks
from . import reference as ref


def _check_like(name, x, like, like_name):
    """A per-token float input with the shape and device of `like` (argument `like_name`)."""
    return _checks.check_tensor(name, x, floating=True, shape=like.shape, shape_of=like_name, device=like.device,
                                device_of=like_name)


def _check_mask(mask, like, like_name, name="mask"):
    return _checks.check_mask(name, mask, shape=like.shape, shape_of=like_name, device=like.device,
                              device_of=like_name)


def broadcast_advantages(advantages, shape, device=None, device_of="logp"):
    """(B,) -> (B, T); (B, T) as is."""
    _checks.check_tensor("advantages", advantages, floating=True, device=device, device_of=device_of)
    if advantages.dim() == 1 and len(shape) == 2 and advantages.shape[0] == shape[0]:
        return advantages[:, None].expand(shape)
    if tuple(advantages.shape) == tuple(shape):
        return advantages
    raise ValueError(f"advantages must have shape ({shape[0]},) or {tuple(shape)}, got {tuple(advantages.shape)}")


def _check_clip(clip_low, clip_high, dual_clip):
    if not 0 <= clip_low < 1:
        raise ValueError(f"clip_low must be in [0, 1), got {clip_low}")
    if not clip_high >= 0:
        raise ValueError(f"clip_high must be >= 0, got {clip_high}")
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")


def _check_kind(kind, alpha):
    if kind not in ref.DIVERGENCES:
        raise ValueError(f"kind must be one of {ref.DIVERGENCES}, got {kind!r}")
    if kind == "alpha" and not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


def _check_agg(loss_agg):
    if loss_agg not in ref.AGG_MODES:
        raise ValueError(f"loss_agg must be one of {ref.AGG_MODES}, got {loss_agg!r}")


def masked_mean(x, mask):
    return float(masked_mean_tensor(x, mask))


def masked_mean_tensor(x, mask):
    """Mean of x over mask as a 0-dim tensor (0 when the mask is empty); no host sync."""
    return torch.where(mask, x, torch.zeros_like(x)).sum() / mask.sum().clamp(min=1)


def masked_max(x, mask):
    return float(x[mask].max()) if bool(mask.any()) else 0.0


def ppo_metrics(logp, old_logp, ratio, clipped_low, clipped_high, clipped_dual, mask, prefix=""):
    """Token means over `mask` of: clip fractions, ratio, and the k3 estimate of KL(pi_old || pi_theta)-ish drift."""
    approx_kl = ref.kl_estimate(old_logp, logp, "k3")  # x = logp - old_logp: e^x - x - 1, as verl's approx_kl
    return {
        f"{prefix}clipfrac_low": masked_mean(clipped_low.float(), mask),
        f"{prefix}clipfrac_high": masked_mean(clipped_high.float(), mask),
        f"{prefix}clipfrac_dual": masked_mean(clipped_dual.float(), mask),
        f"{prefix}ratio_mean": masked_mean(ratio, mask),
        f"{prefix}approx_kl": masked_mean(approx_kl, mask),
    }


def ppo_clip_loss(logp, old_logp, advantages, mask, *, clip_low=0.2, clip_high=0.2, dual_clip=None,
                  loss_agg="token-mean", normalizer=None, norm_length=None):
    """PPO-clip (GRPO / DAPO) loss over the tokens selected by mask.

    Args:
        logp: (B, T) (or any shape (..., T) with matching inputs) float, log pi_theta of the sampled tokens (grad).
        old_logp: float, logp's shape and device, log pi_old of the same tokens (no gradient flows into it).
        advantages: float, (B,) per sequence or logp's shape per token, on logp's device.
        mask: logp's shape, bool (or 0 / 1 integer or float; any other value is an error): the tokens that count.
        clip_low, clip_high: the ratio is clipped to [1 - clip_low, 1 + clip_high]; dual_clip c > 1 bounds the loss
            of negative-advantage tokens at c * |A| (None: off).
        loss_agg, normalizer, norm_length: as dk.aggregate (see the module docstring for micro-batches).

    Returns:
        (loss, metrics): a 0-dim tensor in logp's dtype, differentiable w.r.t. logp; a dict of floats (clip
        fractions low / high / dual, ratio_mean, approx_kl, n_tokens, loss).
    """
    _checks.check_tensor("logp", logp, min_ndim=1, floating=True)
    _check_like("old_logp", old_logp, logp, "logp")
    m = _check_mask(mask, logp, "logp")
    adv = broadcast_advantages(advantages, logp.shape, logp.device)
    _check_clip(clip_low, clip_high, dual_clip)
    _check_agg(loss_agg)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    old = torch.where(m, old_logp.to(logp.dtype), zero)
    adv = torch.where(m, adv.to(logp.dtype), zero)
    lp = torch.where(m, logp, logp.detach() * 0)  # padding cannot send NaN gradients back
    loss_t, ratio, lo, hi, dual = ref.ppo_clip_token_loss(lp, old, adv, clip_low, clip_high, dual_clip)
    loss = ref.aggregate(loss_t, m, loss_agg, normalizer, norm_length)
    metrics = ppo_metrics(lp.detach(), old, ratio.detach(), lo, hi, dual, m)
    metrics["n_tokens"] = int(m.sum())
    metrics["loss"] = float(loss.detach())
    return loss, metrics


def f_divergence(log_ratio, kind, *, alpha=0.5, clamp=None):
    """Per-token generator g = f(u), u = exp(log_ratio), log_ratio = log pi_theta - log pi_ref on samples from pi_ref.

    Its mean over samples y ~ pi_ref estimates D_f(pi_theta || pi_ref) (kinds in reference.f_generator).
    clamp=(lo, hi) clamps f (gradient 0 outside): the released DPH-F code clamps its forward-KL ("k3") term to
    (-10, 10) and also the log-ratio to +-20; with |log_ratio| <= 20 the latter never binds.
    Safe (finite value and gradient) for |log_ratio| <= 50 in float32.

    log_ratio: float tensor of any shape; kind: one of dk.DIVERGENCES; alpha: for kind="alpha", in (0, 1).
    Returns g, log_ratio's shape and dtype, differentiable w.r.t. log_ratio.
    """
    _checks.check_tensor("log_ratio", log_ratio, floating=True)
    _check_kind(kind, alpha)
    g = ref.f_generator(log_ratio, kind, alpha)
    if clamp is not None:
        g = torch.clamp(g, clamp[0], clamp[1])
    return g


def kl_penalty(logp, ref_logp, estimator="k3"):
    """Per-token estimate of KL(pi_theta || pi_ref) on pi_theta's samples: k1 | k2 | k3 | abs (verl's names).
    Used as a loss (sampling not differentiated), k3's expected gradient is grad KL(pi_ref || pi_theta) (forward),
    k2's grad KL(pi_theta || pi_ref) (reverse), k1's zero.

    logp: float, any shape, log pi_theta of the sampled tokens; ref_logp: float, logp's shape and device, log pi_ref
    of the same tokens. Returns a tensor of logp's shape (differentiable w.r.t. both)."""
    _checks.check_tensor("logp", logp, floating=True)
    _check_like("ref_logp", ref_logp, logp, "logp")
    if estimator not in ref.KL_ESTIMATORS:
        raise ValueError(f"estimator must be one of {ref.KL_ESTIMATORS}, got {estimator!r}")
    return ref.kl_estimate(logp, ref_logp, estimator)


def aggregate(values, mask, mode="token-mean", normalizer=None, norm_length=None):
    """Aggregate per-token values over mask with verl's loss_agg_mode semantics (reference.aggregation_weights).

    values: (B, T) float; mask: values' shape and device, bool (or 0 / 1); mode: "token-mean" |
    "seq-mean-token-mean" | "seq-mean-token-sum" | "seq-mean-token-sum-norm"; normalizer: the whole step's
    denominator for micro-batches (module docstring); norm_length: the constant T of "seq-mean-token-sum-norm".
    Returns a 0-dim tensor, differentiable w.r.t. values."""
    _checks.check_tensor("values", values, min_ndim=1, floating=True)
    m = _check_mask(mask, values, "values")
    _check_agg(mode)
    if normalizer is not None and not float(normalizer) > 0:
        raise ValueError(f"normalizer must be > 0, got {normalizer}")
    return ref.aggregate(values, m, mode, normalizer, norm_length)


def grpo_advantages(rewards, group_size, *, norm_std=True, eps=1e-6):
    """GRPO advantages: per group of `group_size` consecutive rewards, (R - mean) / (unbiased std + eps).

    rewards: (N,) (N a multiple of group_size; a group = the rollouts of one prompt, consecutive); integer or bool
    rewards are read as float. norm_std=False: R - mean only (Dr. GRPO). Returns (N,) float."""
    _checks.check_tensor("rewards", rewards, ndim=1)
    if not rewards.dtype.is_floating_point:
        rewards = rewards.float()
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if rewards.numel() % group_size:
        raise ValueError(f"rewards has {rewards.numel()} entries, not a multiple of group_size={group_size}")
    return ref.grpo_advantages(rewards, group_size, norm_std, eps)
