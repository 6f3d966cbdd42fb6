"""RL losses on per-token log-probs from any source (validated public wrappers around reference.py's math).

    loss, metrics = dk.ppo_clip_loss(logp, old_logp, advantages, mask, clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    g = dk.f_divergence(logp - ref_logp, "js")            # per-token generator f(u), u = pi_theta / pi_ref
    k = dk.kl_penalty(logp, ref_logp, estimator="k3")     # per-token reverse-KL estimate (the RKL baseline)
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


def _check_same_shape(name, x, shape):
    _checks.check_tensor(name, x)
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")


def _check_mask(mask, shape):
    _check_same_shape("mask", mask, shape)
    if mask.dtype.is_floating_point and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("mask must hold only 0 and 1 (or be bool)")
    return mask.bool()


def broadcast_advantages(advantages, shape):
    """(B,) -> (B, T); (B, T) as is."""
    _checks.check_tensor("advantages", advantages)
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
    n = mask.sum()
    return float(torch.where(mask, x, torch.zeros_like(x)).sum() / n) if n > 0 else 0.0


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
    """PPO-clip (GRPO / DAPO) loss over the tokens selected by mask. Returns (scalar loss, metrics dict).

    logp, old_logp, mask: (B, T); advantages (B,) or (B, T). See the module docstring for `normalizer`.
    """
    _checks.check_tensor("logp", logp, min_ndim=1)
    _check_same_shape("old_logp", old_logp, logp.shape)
    m = _check_mask(mask, logp.shape)
    adv = broadcast_advantages(advantages, logp.shape)
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
    """
    _checks.check_tensor("log_ratio", log_ratio)
    if not log_ratio.dtype.is_floating_point:
        raise TypeError(f"log_ratio must be a floating tensor, got {log_ratio.dtype}")
    _check_kind(kind, alpha)
    g = ref.f_generator(log_ratio, kind, alpha)
    if clamp is not None:
        g = torch.clamp(g, clamp[0], clamp[1])
    return g


def kl_penalty(logp, ref_logp, estimator="k3"):
    """Per-token estimate of KL(pi_theta || pi_ref) on pi_theta's samples: k1 | k2 | k3 | abs (verl's names)."""
    _checks.check_tensor("logp", logp)
    _check_same_shape("ref_logp", ref_logp, logp.shape)
    if estimator not in ref.KL_ESTIMATORS:
        raise ValueError(f"estimator must be one of {ref.KL_ESTIMATORS}, got {estimator!r}")
    return ref.kl_estimate(logp, ref_logp, estimator)


def aggregate(values, mask, mode="token-mean", normalizer=None, norm_length=None):
    """Aggregate per-token values (B, T) over mask with verl's loss_agg_mode semantics
    (reference.aggregation_weights)."""
    _checks.check_tensor("values", values, min_ndim=1)
    m = _check_mask(mask, values.shape)
    _check_agg(mode)
    if normalizer is not None and not float(normalizer) > 0:
        raise ValueError(f"normalizer must be > 0, got {normalizer}")
    return ref.aggregate(values, m, mode, normalizer, norm_length)


def grpo_advantages(rewards, group_size, *, norm_std=True, eps=1e-6):
    """GRPO advantages: per group of `group_size` consecutive rewards, (R - mean) / (unbiased std + eps)."""
    _checks.check_tensor("rewards", rewards, ndim=1)
    if not rewards.dtype.is_floating_point:
        rewards = rewards.float()
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if rewards.numel() % group_size:
        raise ValueError(f"rewards has {rewards.numel()} entries, not a multiple of group_size={group_size}")
    return ref.grpo_advantages(rewards, group_size, norm_std, eps)
