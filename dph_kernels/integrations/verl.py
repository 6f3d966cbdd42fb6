"""verl adapter (pinned: verl==0.9.1, in its own environment: it pins transformers < 5.11; `make test-verl`).

`pip install "dph[verl]"` registers this module under verl's `verl.plugins` entry-point group, so `import verl`
loads it and verl's policy-loss registry gains:

    dph_ppo   PPO-clip / GRPO (clip_ratio_low / clip_ratio_high, dual clip clip_ratio_c, rollout_is_weights) through
              dph_kernels' PPO-clip math, with verl's loss_agg_mode and global-batch normalisation.

Enable it from a verl config:  actor_rollout_ref.actor.policy_loss.loss_mode=dph_ppo
(with VERL_USE_EXTERNAL_PLUGINS unset or listing `dph`). rollout_is_weights (>= 0) are folded into the advantages:
PPO-clip, dual clip included, is positively homogeneous in A, so w * loss(A) = loss(w * A).

Not here yet: a whole-loss function for DPH rows and the forward patch for verl's fused-kernel path (see the README).
"""
from __future__ import annotations

import torch

from ..losses import ppo_clip_loss

VERL_VERSION = "0.9.1"
LOSS_NAME = "dph_ppo"


def _normalizer(loss_agg_mode, mask, dp_size=1, batch_num_tokens=None, global_batch_size=None,
                loss_scale_factor=None):
    """verl's agg_loss denominators (verl.trainer.ppo.core_algos.agg_loss) as dk's (normalizer, norm_length):
    a rank's loss is divided by the global count / dp_size, so that DP gradient averaging gives the global mean."""
    if loss_agg_mode == "token-mean":
        n = mask.sum() if batch_num_tokens is None else batch_num_tokens
        return float(n) / dp_size if float(n) > 0 else None, None
    if loss_agg_mode in ("seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        n = (mask.sum(-1) > 0).sum() if global_batch_size is None else global_batch_size
        norm = float(n) / dp_size if float(n) > 0 else None
        if loss_agg_mode == "seq-mean-token-sum-norm":
            length = mask.shape[-1] if loss_scale_factor is None else loss_scale_factor
            return (None if norm is None else norm * length), length
        return norm, None
    raise ValueError(f"loss_agg_mode={loss_agg_mode!r} is not expressed by dph_kernels "
                     "(token-mean, seq-mean-token-sum, seq-mean-token-mean, seq-mean-token-sum-norm)")


def dph_ppo_policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
                        rollout_is_weights=None):
    """verl policy-loss signature -> (loss, metrics with verl's names)."""
    if config is None:
        raise ValueError("config (verl's ActorConfig) is required: it holds clip_ratio / clip_ratio_low / _high / _c")
    clip = config.clip_ratio
    low = config.clip_ratio_low if config.clip_ratio_low is not None else clip
    high = config.clip_ratio_high if config.clip_ratio_high is not None else clip
    dual = config.get("clip_ratio_c", 3.0)
    adv = advantages if rollout_is_weights is None else advantages * rollout_is_weights
    info = dict(getattr(config, "global_batch_info", None) or {})
    normalizer, norm_length = _normalizer(loss_agg_mode, response_mask.bool(), **info)
    loss, m = ppo_clip_loss(log_prob, old_log_prob, adv, response_mask.bool(), clip_low=low, clip_high=high,
                            dual_clip=dual, loss_agg=loss_agg_mode, normalizer=normalizer, norm_length=norm_length)
    mask = response_mask.bool()
    n = mask.sum().clamp(min=1)
    ppo_kl = float(torch.where(mask, (old_log_prob - log_prob).detach(), torch.zeros_like(log_prob)).sum() / n)
    metrics = {"actor/pg_clipfrac": m["clipfrac_low"] + m["clipfrac_high"], "actor/ppo_kl": ppo_kl,
               "actor/pg_clipfrac_lower": m["clipfrac_dual"]}
    return loss, metrics


def register():
    """Register dph_ppo in verl's policy-loss registry (idempotent)."""
    from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY, register_policy_loss

    if LOSS_NAME not in POLICY_LOSS_REGISTRY:
        register_policy_loss(LOSS_NAME)(dph_ppo_policy_loss)


try:  # the entry point imports this module while `import verl` runs
    register()
except ImportError:  # verl absent: the module still imports (register() raises then)
    pass
