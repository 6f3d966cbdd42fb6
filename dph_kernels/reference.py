"""Plain-PyTorch math: the single source of truth.

Every function here works in whatever floating dtype it is given. The tests call it with float64 inputs to get the
"truth", and with the inputs' own dtype to get the "same-dtype PyTorch" error that the numerics contract scales by.
It materializes the [tokens x vocab] logits: use it for checking, not for training (that is `impl="reference"`).

The elementwise math (f-divergence generators, PPO-clip, KL estimators) lives here once and is reused by the chunked
torch path, the fused loss and the tests; the Triton kernels carry the same formulas in `tl` form.
"""
from __future__ import annotations

import math

import torch

# --------------------------------------------------------------------------------------------------------------------
# Linear log-prob
# --------------------------------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs, fp64 for fp64 inputs (the truth)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def scaled_logits(hidden, weight, bias=None, temperature=1.0):
    """z = (hidden @ weight.T + bias) / T, with the matmul in the input dtype (as eager PyTorch does) and the
    division in fp32 / fp64."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    return logits.to(_compute_dtype(hidden.dtype)) / temperature


def linear_logprob(hidden, weight, targets, bias=None, temperature=1.0, ignore_index=-100, return_entropy=False):
    """log softmax(hidden @ W.T / T + b / T)[target] (and the entropy), materializing the logits."""
    z = scaled_logits(hidden, weight, bias, temperature)
    logprobs = torch.log_softmax(z, dim=-1)
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    logp = logprobs.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    if not return_entropy:
        return logp
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    entropy = torch.where(valid, entropy, torch.zeros_like(entropy))
    return logp, entropy
