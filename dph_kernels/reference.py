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


def head_transform(logits, softcap=None, logit_scale=1.0, temperature=1.0):
    """z = softcap(logit_scale * logits) / temperature, softcap(x) = cap * tanh(x / cap) (identity when None).

    The order is the models' own: Cohere multiplies lm_head's output by logit_scale (modeling_cohere.py,
    `logits * self.logit_scale`); Gemma 2 caps lm_head's output with final_logit_softcapping (modeling_gemma2.py:
    `logits / cap`, `tanh`, `* cap`); the sampler and the trainers (TRL, verl, this loop) divide the model's logits
    by the temperature afterwards. Scale and temperature are linear, so without a cap they fold into one factor."""
    z = logits * logit_scale if logit_scale != 1.0 else logits
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def head_factors(softcap=None, logit_scale=1.0, temperature=1.0):
    """(pre, post) with head_transform(a) = post * tanh(pre * a) when softcap is set (post = cap / T,
    pre = logit_scale / cap), and = pre * a with post None otherwise (pre = logit_scale / T). The kernels use this
    form; d z / d a = pre * post * (1 - (z / post)^2), or pre (head_slope)."""
    if softcap is None:
        return logit_scale / temperature, None
    return logit_scale / softcap, softcap / temperature


def head_slope(z, pre, post):
    """d z / d a of head_factors' form, from z itself (no need to keep the raw logits)."""
    if post is None:
        return pre
    t = z / post
    return (1.0 - t * t) * (pre * post)


def scaled_logits(hidden, weight, bias=None, temperature=1.0, softcap=None, logit_scale=1.0):
    """z = head_transform(hidden @ weight.T + bias), with the matmul in the input dtype (as eager PyTorch does) and
    the rest in fp32 / fp64."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    return head_transform(logits.to(_compute_dtype(hidden.dtype)), softcap, logit_scale, temperature)


def linear_logprob(hidden, weight, targets, bias=None, temperature=1.0, ignore_index=-100, return_entropy=False,
                   softcap=None, logit_scale=1.0):
    """log softmax(head_transform(hidden @ W.T + b))[target] (and the entropy), materializing the logits."""
    z = scaled_logits(hidden, weight, bias, temperature, softcap, logit_scale)
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


# --------------------------------------------------------------------------------------------------------------------
# f-divergence generators, on log_ratio = log pi_theta - log pi_ref (u = exp(log_ratio))
# --------------------------------------------------------------------------------------------------------------------

DIVERGENCES = ("fkl", "fkl_k1", "js", "alpha", "rkl", "tv", "hellinger")
# f''(1) of each generator (and of the k2 / k3 penalties): near pi_ref every f-divergence is f''(1)/2 chi^2, so
# kappa = eta * f''(1) compares strengths across divergences (experiments.md §2). tv is not smooth at 1.
CURVATURE = {"fkl": 1.0, "fkl_k1": 1.0, "js": 0.25, "alpha": 1.0, "rkl": 1.0, "hellinger": 0.5, "tv": None,
             "k2": 1.0, "k3": 1.0}
_LN2 = math.log(2.0)


def f_generator(log_ratio, kind, alpha=0.5, log_weight=None):
    """w * f(u) at u = exp(log_ratio), w = exp(log_weight) (w = 1 when log_weight is None).

    One definition serves both estimators of D_f(pi_theta || pi_ref) = E_{y ~ pi_ref}[f(pi_theta(y) / pi_ref(y))]:
    the sampled one (w = 1 at tokens drawn from pi_ref) and the exact one (the sum over the vocabulary with
    w = pi_ref(v), log_ratio = log pi_theta(v) - log pi_ref(v)). Written with w u = exp(log_weight + log_ratio) so
    the exact sum never overflows (w u = pi_theta(v) <= 1), and the sampled form is finite (value and gradient)
    for |log_ratio| <= 50 in float32. Kinds (method.md's table):
      fkl        u - 1 - log u                       KL(pi_ref || pi_theta), with the zero-mean control variate u - 1
      fkl_k1     -log u                              KL(pi_ref || pi_theta), plain
      js         1/2 [u log u - (u+1) log((u+1)/2)]  JS(pi_theta, pi_ref) (the released code optimises 2 x this)
      alpha      (u^(1-a) - (1-a) u - a) / (a (a-1)) a -> 1: forward KL, a -> 0: reverse KL
      rkl        u log u - u + 1                     KL(pi_theta || pi_ref)
      tv         1/2 |u - 1|                         total variation
      hellinger  (sqrt(u) - 1)^2                     squared Hellinger
    """
    return f_generator_parts(log_ratio, kind, alpha, log_weight)[0]()


def f_generator_parts(log_ratio, kind, alpha=0.5, log_weight=None):
    """(value, slope): two thunks sharing w and w u, for w f(u) (f_generator) and its derivative in log_ratio,
    w u f'(u). The tiled torch path of linear_f_divergence uses the slope instead of autograd; the tests check it
    against autograd of the value."""
    r = log_ratio
    lw = torch.zeros_like(r) if log_weight is None else log_weight
    w = torch.exp(lw)
    wu = torch.exp(lw + r)
    softplus = torch.nn.functional.softplus
    if kind == "fkl":
        value, slope = (lambda: wu - w - w * r), (lambda: wu - w)
    elif kind == "fkl_k1":
        value, slope = (lambda: -w * r), (lambda: -w)
    elif kind == "js":
        # u log u - (u+1) log((u+1)/2) = u (ln2 - softplus(-r)) - (softplus(r) - ln2): no cancellation of huge terms;
        # u f'(u) = u/2 log(2u / (u+1)) = u/2 (ln2 - softplus(-r))
        value = lambda: 0.5 * (wu * (_LN2 - softplus(-r)) - w * (softplus(r) - _LN2))  # noqa: E731
        slope = lambda: 0.5 * wu * (_LN2 - softplus(-r))  # noqa: E731
    elif kind == "alpha":
        a = alpha
        value = lambda: (torch.exp(lw + (1 - a) * r) - (1 - a) * wu - a * w) / (a * (a - 1))  # noqa: E731
        slope = lambda: (wu - torch.exp(lw + (1 - a) * r)) / a  # noqa: E731
    elif kind == "rkl":
        value, slope = (lambda: wu * (r - 1) + w), (lambda: wu * r)
    elif kind == "tv":
        value, slope = (lambda: 0.5 * (wu - w).abs()), (lambda: 0.5 * wu * torch.sign(r))
    elif kind == "hellinger":
        value = lambda: (torch.exp(0.5 * (lw + r)) - torch.exp(0.5 * lw)) ** 2  # noqa: E731
        slope = lambda: wu - torch.exp(lw + 0.5 * r)  # noqa: E731
    else:
        raise ValueError(f"kind must be one of {DIVERGENCES}, got {kind!r}")
    return value, slope


def linear_f_divergence(hidden, weight, ref_hidden, ref_weight, kind="fkl", alpha=0.5, bias=None, ref_bias=None,
                        temperature=1.0, mask=None, softcap=None, logit_scale=1.0, ref_softcap=None,
                        ref_logit_scale=1.0):
    """Exact D_f(pi_theta || pi_ref) = sum_v pi_ref(v) f(pi_theta(v) / pi_ref(v)) per position, materializing both
    [N, V] logits."""
    log_p = torch.log_softmax(scaled_logits(hidden, weight, bias, temperature, softcap, logit_scale), -1)
    log_q = torch.log_softmax(scaled_logits(ref_hidden, ref_weight, ref_bias, temperature, ref_softcap,
                                            ref_logit_scale), -1)
    div = f_generator(log_p - log_q, kind, alpha, log_weight=log_q).sum(-1)
    if mask is not None:
        div = torch.where(mask, div, torch.zeros_like(div))
    return div


# --------------------------------------------------------------------------------------------------------------------
# KL estimators (the RKL baseline's penalty), PPO-clip, GRPO advantages
# --------------------------------------------------------------------------------------------------------------------

KL_ESTIMATORS = ("k1", "k2", "k3", "abs")


def kl_estimate(logp, ref_logp, estimator="k3"):
    """Per-token estimate of the VALUE of KL(pi_theta || pi_ref) on samples from pi_theta (k1, k2 biased, k3
    unbiased). As a loss their gradients differ: k3's is a forward-KL gradient in expectation, k2's the reverse-KL one,
    k1's zero (fused.PRESETS' comment)."""
    d = logp - ref_logp
    if estimator == "k1":
        return d
    if estimator == "abs":
        return d.abs()
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        x = -d  # e^x - x - 1 with x = log pi_ref - log pi_theta
        return torch.expm1(x) - x
    raise ValueError(f"estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


LOG_RATIO_CLAMP = 20.0  # the ratio's log is clamped to +-20 before exp (verl / the released code)


def ppo_clip_token_loss(logp, old_logp, advantages, clip_low=0.2, clip_high=0.2, dual_clip=None):
    """Per-token PPO-clip loss max(-A r, -A clip(r, 1-eps_low, 1+eps_high)), with dual clip min(., -c A) for A < 0.

    Returns (loss, ratio, clipped_low, clipped_high, clipped_dual): the boolean masks mark where each clip binds.
    """
    return ppo_clip_from_log_ratio(logp - old_logp, advantages, clip_low, clip_high, dual_clip)


def ppo_clip_from_log_ratio(log_ratio, advantages, clip_low=0.2, clip_high=0.2, dual_clip=None):
    """ppo_clip_token_loss for a given log-ratio (a token's, or its sequence's: GSPO)."""
    ratio = torch.exp(torch.clamp(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    clipped_high = (advantages > 0) & (ratio > 1 + clip_high)
    clipped_low = (advantages < 0) & (ratio < 1 - clip_low)
    if dual_clip is not None:
        bound = -dual_clip * advantages
        clipped_dual = (advantages < 0) & (loss > bound)
        loss = torch.where(clipped_dual, bound, loss)
    else:
        clipped_dual = torch.zeros_like(clipped_high)
    return loss, ratio, clipped_low, clipped_high, clipped_dual


# Policy losses on the D_exp tokens (FusedLinearDPHLoss(policy_loss=...)), each as TRL 1.16's GRPOTrainer defines it:
#   ppo    PPO-clip (grpo / bnpo / dr_grpo / dapo / luspo in TRL: they differ only in the aggregation)
#   cispo  -sg(min(r, cap)) A log pi, cap = cispo_max_weight or 1 + clip_high   (CISPO: a constant IS weight)
#   sapo   -sigmoid(tau (r - 1)) 4 / tau A, tau = tau_pos if A > 0 else tau_neg   (SAPO's soft gate)
#   vespo  -sg(phi(w)) A log pi, phi(w) = exp(lam + k log w - lam w), w the sequence's IS ratio (VESPO)
# importance_sampling_level "sequence" (GSPO) replaces each token's log-ratio by its sequence's mean (in value; see
# policy_token_loss for its gradient).
POLICY_LOSSES = ("ppo", "cispo", "sapo", "vespo")
IS_LEVELS = ("token", "sequence")
VESPO_LOG_W_MIN = math.log(1e-8)  # TRL's clamp of the sequence log-ratio


def sequence_log_ratio(log_ratio, mask, mean=True):
    """Each row's (mean | sum) of its token log-ratios over mask (rows, T), broadcast back over the row."""
    m = mask.to(log_ratio.dtype)
    total = (log_ratio * m).sum(-1, keepdim=True)
    if mean:
        total = total / m.sum(-1, keepdim=True).clamp(min=1.0)
    return total.expand_as(log_ratio)


@torch.no_grad()
def vespo_weight(log_ratio, advantages, mask, cfg):
    """VESPO's constant weight phi(w) = exp(lam + k log w - lam w) of each row's IS ratio w = exp(sum of its clamped
    token log-ratios), k / lam by the advantage's sign; returns (phi, w), broadcast over the row's tokens."""
    seq = sequence_log_ratio(torch.clamp(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP), mask, mean=False)
    log_w = torch.clamp(seq, VESPO_LOG_W_MIN, LOG_RATIO_CLAMP)
    pos = advantages >= 0
    k = torch.where(pos, cfg["vespo_k_pos"], cfg["vespo_k_neg"])
    lam = torch.where(pos, cfg["vespo_lambda_pos"], cfg["vespo_lambda_neg"]).clamp(min=1e-4)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    return phi, torch.exp(log_w)


def policy_token_loss(logp, old_logp, advantages, cfg, mask=None):
    """The D_exp per-token loss of cfg["policy_loss"] at cfg["importance_sampling_level"] (see POLICY_LOSSES).
    Inputs (rows, T) when a sequence aggregate is needed (sequence level, vespo; mask marks each row's tokens), any
    shape otherwise. Returns (loss, ratio, clipped_low, clipped_high, clipped_dual) as ppo_clip_token_loss does."""
    kind = cfg.get("policy_loss", "ppo")
    log_ratio = logp - old_logp
    if kind == "vespo":
        phi, w = vespo_weight(log_ratio, advantages, mask, cfg)
        none = torch.zeros(torch.broadcast_shapes(log_ratio.shape, advantages.shape), dtype=torch.bool,
                           device=logp.device)
        return -phi * advantages * logp, w, none, none, none
    if cfg.get("importance_sampling_level", "token") == "sequence":
        # The value is the sequence's mean log-ratio; each token's gradient goes to its own log-prob (GSPO's
        # sg[s_i] pi_t / sg[pi_t] form, as verl writes it). With one advantage per sequence and any aggregation
        # whose weights are constant along a row (all of loss_agg's), the gradients equal those of differentiating
        # through the mean (TRL's form); with per-token advantages this is the per-token form.
        log_ratio = logp - logp.detach() + sequence_log_ratio(log_ratio, mask).detach()
    if kind == "ppo":
        return ppo_clip_from_log_ratio(log_ratio, advantages, cfg["clip_low"], cfg["clip_high"], cfg["dual_clip"])
    ratio = torch.exp(torch.clamp(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    none = torch.zeros(torch.broadcast_shapes(ratio.shape, advantages.shape), dtype=torch.bool, device=logp.device)
    if kind == "cispo":  # TRL: one-sided, min(r, cap); verl also bounds it below (cispo_min_weight)
        cap = cfg.get("cispo_max_weight") or 1 + cfg["clip_high"]
        weight = torch.clamp(ratio, min=cfg.get("cispo_min_weight"), max=cap).detach()
        return -weight * advantages * logp, ratio, none, (advantages > 0) & (ratio > cap), none
    if kind == "sapo":
        tau = torch.where(advantages > 0, cfg["sapo_temperature_pos"], cfg["sapo_temperature_neg"])
        return -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * advantages, ratio, none, none, none
    raise ValueError(f"policy_loss must be one of {POLICY_LOSSES}, got {kind!r}")


def grpo_advantages(rewards, group_size, norm_std=True, eps=1e-6):
    """(R - mean_group R) / (std_group R + eps), unbiased std, groups = consecutive runs of group_size rewards."""
    r = rewards.reshape(-1, group_size)
    adv = r - r.mean(1, keepdim=True)
    if norm_std:
        std = r.std(1, keepdim=True, unbiased=True) if group_size > 1 else torch.zeros_like(adv[:, :1])
        adv = adv / (std + eps)
    return adv.reshape(rewards.shape)


# --------------------------------------------------------------------------------------------------------------------
# Aggregation (verl's loss_agg_mode)
# --------------------------------------------------------------------------------------------------------------------

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def aggregation_weights(mask, mode, normalizer=None, norm_length=None):
    """Weights w (same shape as mask, 2-D (rows, T)) such that the aggregated loss is sum(w * token_loss).

      token-mean               sum over tokens / (number of tokens)              normalizer: global token count
      seq-mean-token-mean      mean over rows of (row sum / row tokens)          normalizer: global row count
      seq-mean-token-sum       mean over rows of (row sum)                       normalizer: global row count
      seq-mean-token-sum-norm  sum / (rows x norm_length) (Dr. GRPO)            normalizer: global rows x norm_length
    Rows with no token count as no row. Nothing selected -> all-zero weights (a zero loss, never NaN).
    """
    m = mask.to(torch.float64 if mask.dtype == torch.float64 else torch.float32)
    if m.dim() == 1:
        m = m.unsqueeze(0)
    row_tokens = m.sum(-1)
    rows = (row_tokens > 0).sum()
    if mode == "token-mean":
        denom = m.sum() if normalizer is None else normalizer
        w = m
    elif mode == "seq-mean-token-mean":
        denom = rows if normalizer is None else normalizer
        w = m / row_tokens.clamp_min(1).unsqueeze(-1)
    elif mode == "seq-mean-token-sum":
        denom = rows if normalizer is None else normalizer
        w = m
    elif mode == "seq-mean-token-sum-norm":
        length = m.shape[-1] if norm_length is None else norm_length
        denom = rows * length if normalizer is None else normalizer
        w = m
    else:
        raise ValueError(f"loss_agg must be one of {AGG_MODES}, got {mode!r}")
    denom = torch.as_tensor(denom, dtype=w.dtype, device=w.device)
    w = w / torch.where(denom > 0, denom, torch.ones_like(denom))
    return w.reshape(mask.shape)


def aggregate(values, mask, mode, normalizer=None, norm_length=None):
    w = aggregation_weights(mask, mode, normalizer, norm_length).to(values.dtype)
    # where, not multiply: a NaN/inf in a masked-out token must not leak into the loss
    return torch.where(w != 0, values * w, torch.zeros_like(values)).sum()
