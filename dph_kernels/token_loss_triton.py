"""Triton form of the per-token RL math (reference.py holds the torch form; the tests hold them equal).

* `f_and_grad(r, lw, KIND, alpha)`: an f-divergence generator w f(u) and w u f'(u) = d (w f) / d log u at
  u = exp(r), w = exp(lw) (w = 1 for sampled tokens, pi_ref(v) for the exact sum). Shared
  by the elementwise token-loss kernel below and by the exact whole-vocabulary divergence kernel.
* `_token_loss_kernel`: one pass over the tokens of a hybrid batch. For each token it evaluates the PPO-clip loss
  (+ a reverse-KL penalty) on exploration tokens or the generator on near-perfect tokens, multiplies by the token's
  aggregation weight, and writes the weighted loss and its derivative with respect to log pi_theta, so backward is
  a single multiply. O(tokens) memory.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference as ref

LN2 = tl.constexpr(0.6931471805599453)  # a constexpr: the compiler (unlike the interpreter) refuses plain globals
KIND_IDS = {k: i for i, k in enumerate(ref.DIVERGENCES)}
KL_IDS = {k: i for i, k in enumerate(ref.KL_ESTIMATORS)}


@triton.jit
def _softplus(x):
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def f_and_grad(r, lw, KIND: tl.constexpr, alpha):
    """(w f(u), w u f'(u)) at u = exp(r), w = exp(lw); KIND indexes reference.DIVERGENCES (reference.f_generator
    is the same math in torch; w u f'(u) is its derivative with respect to r)."""
    w = tl.exp(lw)
    wu = tl.exp(lw + r)
    if KIND == 0:  # fkl: u - 1 - log u
        f = wu - w - w * r
        d = wu - w
    elif KIND == 1:  # fkl_k1: -log u
        f = -w * r
        d = -w
    elif KIND == 2:  # js: 1/2 [u (ln2 - softplus(-r)) - (softplus(r) - ln2)]
        a = LN2 - _softplus(-r)
        f = 0.5 * (wu * a - w * (_softplus(r) - LN2))
        d = 0.5 * wu * a
    elif KIND == 3:  # alpha: (u^(1-a) - (1-a) u - a) / (a (a - 1))
        wua = tl.exp(lw + (1.0 - alpha) * r)
        f = (wua - (1.0 - alpha) * wu - alpha * w) / (alpha * (alpha - 1.0))
        d = (wu - wua) / alpha
    elif KIND == 4:  # rkl: u log u - u + 1
        f = wu * (r - 1.0) + w
        d = wu * r
    elif KIND == 5:  # tv: |u - 1| / 2
        f = 0.5 * tl.abs(wu - w)
        d = tl.where(r > 0.0, 0.5 * wu, tl.where(r < 0.0, -0.5 * wu, 0.0))
    else:  # hellinger: (sqrt(u) - 1)^2
        s = tl.exp(0.5 * (lw + r))
        t = tl.exp(0.5 * lw)
        f = (s - t) * (s - t)
        d = s * (s - t)
    return f, d


@triton.jit
def _token_loss_kernel(Logp, Old, Adv, Ref, ORef, IsPef, Wt, Contrib, DLogp, Ratio, Flags, Kl, Div,
                       n, clip_low, clip_high, dual_clip, kl_beta, alpha, clamp_lo, clamp_hi,
                       KIND: tl.constexpr, HAS_DIV: tl.constexpr, KL_EST: tl.constexpr, HAS_KL: tl.constexpr,
                       HAS_DUAL: tl.constexpr, HAS_CLAMP: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    msk = offs < n
    lp = tl.load(Logp + offs, mask=msk, other=0.0)
    w = tl.load(Wt + offs, mask=msk, other=0.0)
    pef = tl.load(IsPef + offs, mask=msk, other=0) != 0

    # Exploration tokens: PPO-clip, dual clip, reverse-KL penalty.
    old = tl.load(Old + offs, mask=msk, other=0.0)
    adv = tl.load(Adv + offs, mask=msk, other=0.0)
    lr = lp - old
    lr_c = tl.minimum(tl.maximum(lr, -20.0), 20.0)
    ratio = tl.exp(lr_c)
    d_ratio = tl.where((lr >= -20.0) & (lr <= 20.0), ratio, 0.0)
    unclipped = -adv * ratio
    r_clip = tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
    clipped = -adv * r_clip
    in_range = (ratio >= 1.0 - clip_low) & (ratio <= 1.0 + clip_high)
    d_unclipped = -adv * d_ratio
    d_clipped = tl.where(in_range, d_unclipped, 0.0)
    pg = tl.maximum(unclipped, clipped)
    # torch.maximum splits the gradient evenly on ties; do the same so both paths agree to the last bit
    d_pg = tl.where(unclipped > clipped, d_unclipped,
                    tl.where(unclipped < clipped, d_clipped, 0.5 * (d_unclipped + d_clipped)))
    hi = (adv > 0) & (ratio > 1.0 + clip_high)
    lo = (adv < 0) & (ratio < 1.0 - clip_low)
    dual = (adv < 0) & (adv > 0)  # all False
    if HAS_DUAL:
        bound = -dual_clip * adv
        dual = (adv < 0) & (pg > bound)
        pg = tl.where(dual, bound, pg)
        d_pg = tl.where(dual, 0.0, d_pg)
    loss_exp = pg
    d_exp = d_pg
    kl = tl.zeros_like(lp)
    if HAS_KL:
        dk = lp - tl.load(ORef + offs, mask=msk, other=0.0)
        if KL_EST == 0:  # k1
            kl = dk
            d_kl = tl.full(dk.shape, 1.0, tl.float32)
        elif KL_EST == 1:  # k2
            kl = 0.5 * dk * dk
            d_kl = dk
        elif KL_EST == 2:  # k3: e^x - x - 1, x = -dk
            ex = tl.exp(-dk)
            kl = ex + dk - 1.0
            d_kl = 1.0 - ex
        else:  # abs
            kl = tl.abs(dk)
            d_kl = tl.where(dk > 0, 1.0, tl.where(dk < 0, -1.0, 0.0))
        loss_exp += kl_beta * kl
        d_exp += kl_beta * d_kl

    # Near-perfect tokens: the generator on log pi_theta - log pi_ref.
    g = tl.zeros_like(lp)
    d_g = tl.zeros_like(lp)
    if HAS_DIV:
        g, d_g = f_and_grad(lp - tl.load(Ref + offs, mask=msk, other=0.0), tl.zeros_like(lp), KIND, alpha)
        if HAS_CLAMP:
            d_g = tl.where((g >= clamp_lo) & (g <= clamp_hi), d_g, 0.0)
            g = tl.minimum(tl.maximum(g, clamp_lo), clamp_hi)

    active = msk & (w != 0.0)
    loss = tl.where(pef, g, loss_exp)
    dloss = tl.where(pef, d_g, d_exp)
    tl.store(Contrib + offs, tl.where(active, w * loss, 0.0), mask=msk)
    tl.store(DLogp + offs, tl.where(active, w * dloss, 0.0), mask=msk)
    tl.store(Ratio + offs, ratio, mask=msk)
    tl.store(Flags + offs, lo.to(tl.int8) + 2 * hi.to(tl.int8) + 4 * dual.to(tl.int8), mask=msk)
    tl.store(Kl + offs, kl, mask=msk)
    tl.store(Div + offs, g, mask=msk)


def token_losses(logp, old, adv, ref_logp, online_ref, is_pef_tok, weights, cfg):
    """All inputs flat fp32 (N,). Returns contrib, dlogp, ratio, flags (int8), kl, div."""
    n = logp.numel()
    out = [torch.empty_like(logp) for _ in range(2)]
    ratio, kl, div = (torch.empty_like(logp) for _ in range(3))
    flags = torch.empty(n, dtype=torch.int8, device=logp.device)
    BLOCK = 1024
    clamp = cfg["divergence_clamp"]
    _token_loss_kernel[(triton.cdiv(n, BLOCK),)](
        logp, old, adv, ref_logp, online_ref, is_pef_tok, weights, out[0], out[1], ratio, flags, kl, div,
        n, cfg["clip_low"], cfg["clip_high"], cfg["dual_clip"] or 0.0, cfg["kl_beta"], cfg["alpha"],
        clamp[0] if clamp else 0.0, clamp[1] if clamp else 0.0,
        KIND=KIND_IDS.get(cfg["divergence"], 0), HAS_DIV=cfg["divergence"] is not None,
        KL_EST=KL_IDS[cfg["kl_estimator"]], HAS_KL=cfg["kl_beta"] != 0, HAS_DUAL=cfg["dual_clip"] is not None,
        HAS_CLAMP=clamp is not None, BLOCK=BLOCK)
    return out[0], out[1], ratio, flags, kl, div
