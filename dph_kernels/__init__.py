"""dph_kernels: fused losses for DPH-RL that never materialize the [tokens x vocab] logits.

    import dph_kernels as dk
    logp = dk.linear_logprob(hidden, lm_head.weight, targets)             # (B, T) fp32
    logp, entropy = dk.linear_logprob(hidden, lm_head.weight, targets, return_entropy=True)
"""
from .linear_logprob import linear_logprob

__all__ = ["linear_logprob"]
__version__ = "0.1.0"
