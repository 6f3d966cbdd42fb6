"""dph_kernels: fused losses for DPH-RL that never materialize the [tokens x vocab] logits.

    import dph_kernels as dk
    logp = dk.linear_logprob(hidden, lm_head.weight, targets)             # (B, T) fp32
    logp, entropy = dk.linear_logprob(hidden, lm_head.weight, targets, return_entropy=True)
    loss_fn = dk.FusedLinearDPHLoss.preset("dph-js")
    out = loss_fn(hidden, lm_head.weight, targets, loss_mask, is_pef, advantages=adv, old_logp=old, ref_logp=ref)
    div = dk.linear_f_divergence(hidden, lm_head.weight, ref_hidden, ref_lm_head.weight, kind="js")  # exact, (B, T)
"""
from .fused import PRESETS, DPHLossOutput, FusedLinearDPHLoss
from .linear_divergence import linear_f_divergence
from .linear_logprob import linear_logprob
from .losses import aggregate, f_divergence, grpo_advantages, kl_penalty, ppo_clip_loss
from .reference import AGG_MODES, CURVATURE, DIVERGENCES, KL_ESTIMATORS

__all__ = [
    "linear_logprob", "linear_f_divergence", "FusedLinearDPHLoss", "DPHLossOutput", "PRESETS",
    "ppo_clip_loss", "f_divergence", "kl_penalty", "aggregate", "grpo_advantages",
    "DIVERGENCES", "KL_ESTIMATORS", "AGG_MODES", "CURVATURE",
]
__version__ = "0.1.0"
