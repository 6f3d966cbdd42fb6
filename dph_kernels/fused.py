"""FusedLinearDPHLoss: the DPH-RL hybrid loss straight from last hidden states and the lm_head weight.

    loss_fn = dk.FusedLinearDPHLoss.preset("dph-js")
    out = loss_fn(hidden, lm_head.weight, targets, loss_mask, is_pef, advantages=adv, old_logp=old, ref_logp=ref)
    out.loss.backward()

Per sequence routing (method.md): rows with is_pef=False (D_exp) get PPO-clip (+ optional reverse-KL penalty and
entropy bonus) on their own advantages; rows with is_pef=True (D_pef) get only the f-divergence generator on their
stored reference log-probs. L = L_exp + eta * L_pef, each aggregated over its own rows with `loss_agg`.

The pieces: one linear_logprob forward (no [tokens x vocab] logits); the per-token losses and their derivatives in
one elementwise pass (a Triton kernel on the Triton path); one linear_logprob backward. Extra memory over
linear_logprob is O(B * T). On the chunked torch path (CPU) the gradient is computed during the forward pass instead,
chunk by chunk, since each token's loss depends on its own log-prob only: three matmuls and no recompute, and one
backward per forward.

Differences from the released reference code (a verl 0.4.1 fork), all explicit here:
* JS: the release optimises 2 x JS (it omits the 1/2); "js" here is the true JS. eta=0.2 on 2 x JS = eta=0.4 here.
* Forward KL: the release clamps log u to +-20 and f to (-10, 10); preset "dph-f" sets divergence_clamp=(-10, 10).
* Weighting: the release averages each 2-sequence micro-batch, so D_pef enters with an effective weight ~ eta / 8
  relative to the PPO term. Here eta is the weight of L_pef against L_exp, each a proper mean over its own tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from . import _checks
from . import reference as ref
from .linear_logprob import linear_logprob, logprob_core
from .losses import _check_agg, _check_clip, _check_kind, masked_mean_tensor

# Which gradient each KL form gives (experiments.md §1; tests/test_kl_gradients.py checks it exactly):
#   kl_beta * k3 on the policy's own samples, k3 = r - log r - 1, r = pi_ref / pi_theta (the paper's "RKL" row, TRL's
#   and verl's KL penalty): E_{pi_theta}[(1 - r) grad log pi_theta] = grad KL(pi_ref || pi_theta), the FORWARD KL.
#   kl_beta * k2, k2 = (log pi_theta - log pi_ref)^2 / 2, on the policy's samples: grad KL(pi_theta || pi_ref), REVERSE.
#   k1 = log pi_theta - log pi_ref as a loss: zero gradient in expectation (E[grad log pi_theta] = 0).
#   divergence="rkl" on stored pi_ref samples (u log u - u + 1): grad KL(pi_theta || pi_ref), reverse, exactly so in
#   expectation; divergence="fkl": grad KL(pi_ref || pi_theta).
# Strength: near pi_ref every one of these is f''(1)/2 chi^2, so kappa = eta * f''(1) (or kl_beta: k2 and k3 have
# curvature 1) is the comparable number; reference.CURVATURE holds f''(1).
PRESETS = {
    # The paper's baselines and methods; ratios are clipped with eps_low = 0.2 and a dual clip c = 3 throughout.
    "grpo": dict(divergence=None, clip_low=0.2, clip_high=0.2, dual_clip=3.0),
    "dapo": dict(divergence=None, clip_low=0.2, clip_high=0.28, dual_clip=3.0),
    # The paper's "RKL" baseline: a k3 penalty to a live reference model on D_exp = all prompts. Its gradient is a
    # forward-KL gradient in expectation (above), hence the name; "rkl" stays as the paper's label for it.
    "kl-k3": dict(divergence=None, clip_low=0.2, clip_high=0.28, dual_clip=3.0, kl_beta=0.01, kl_estimator="k3"),
    # A true reverse-KL (mode-seeking) penalty on the policy's samples: the k2 loss.
    "rkl-k2": dict(divergence=None, clip_low=0.2, clip_high=0.28, dual_clip=3.0, kl_beta=0.01, kl_estimator="k2"),
    "dph-f": dict(divergence="fkl", eta=0.05, clip_low=0.2, clip_high=0.28, dual_clip=3.0,
                  divergence_clamp=(-10.0, 10.0)),
    "dph-js": dict(divergence="js", eta=0.2, clip_low=0.2, clip_high=0.28, dual_clip=3.0),
    # The reverse-KL generator on the stored D_pef samples: dph-f with only f changed (same routing and samples).
    "dph-rkl": dict(divergence="rkl", eta=0.05, clip_low=0.2, clip_high=0.28, dual_clip=3.0,
                    divergence_clamp=(-10.0, 10.0)),
    "alpha": dict(divergence="alpha", alpha=0.5, eta=0.2, clip_low=0.2, clip_high=0.28, dual_clip=3.0),
}
PRESETS["rkl"] = dict(PRESETS["kl-k3"])  # the paper's name for kl-k3 (a forward-KL gradient; see above)


@dataclass
class DPHLossOutput:
    loss: torch.Tensor
    metrics: dict = field(default_factory=dict)
    logp: torch.Tensor | None = None


class _TritonTokenLoss(torch.autograd.Function):
    """Per-token weighted losses from the Triton elementwise kernel; backward is one multiply."""

    @staticmethod
    def forward(ctx, logp, old, adv, ref_logp, online_ref, is_pef_tok, weights, cfg):
        from .token_loss_triton import token_losses
        contrib, dlogp, ratio, flags, kl, div = token_losses(logp, old, adv, ref_logp, online_ref, is_pef_tok,
                                                              weights, cfg)
        ctx.save_for_backward(dlogp)
        ctx.mark_non_differentiable(ratio, flags, kl, div)
        return contrib, ratio, flags, kl, div

    @staticmethod
    def backward(ctx, g_contrib, *_):
        (dlogp,) = ctx.saved_tensors
        return g_contrib * dlogp, None, None, None, None, None, None, None


def _torch_token_loss(logp, old, adv, ref_logp, online_ref, is_pef_tok, weights, cfg, exp_mask=None):
    """The same per-token losses with reference.py's math, differentiated by autograd. Inputs (B, T) with exp_mask
    (the D_exp tokens) when the policy loss needs sequence aggregates (_needs_rows), any equal shapes otherwise."""
    policy, ratio, lo, hi, dual = ref.policy_token_loss(logp, old, adv, cfg, exp_mask)
    loss_exp, kl = policy, torch.zeros_like(logp)
    if cfg["kl_beta"] != 0:
        kl = ref.kl_estimate(logp, online_ref, cfg["kl_estimator"])
        loss_exp = loss_exp + cfg["kl_beta"] * kl
    div = torch.zeros_like(logp)
    if cfg["divergence"] is not None:
        div = ref.f_generator(logp - ref_logp, cfg["divergence"], cfg["alpha"])
        if cfg["divergence_clamp"] is not None:
            div = torch.clamp(div, *cfg["divergence_clamp"])
    loss = torch.where(is_pef_tok, div, loss_exp)
    contrib = torch.where(weights != 0, weights * loss, torch.zeros_like(loss))  # a masked NaN never leaks in
    flags = lo.to(torch.int8) + 2 * hi.to(torch.int8) + 4 * dual.to(torch.int8)
    return contrib, ratio.detach(), flags, kl.detach(), div.detach()


def _needs_rows(cfg):
    """Whether the D_exp loss needs per-sequence aggregates of the log-ratio before any per-token gradient (GSPO's
    sequence-level ratio, VESPO's weight): then the loss takes the two-pass route, linear_logprob's forward and
    backward with the token math in between, instead of the one-pass chunked CPU loss."""
    return cfg["importance_sampling_level"] == "sequence" or cfg["policy_loss"] == "vespo"


def _fill_inputs(logp, token_inputs, masks):
    """old / adv / ref / online-ref per token, each replaced by log pi_theta (detached) outside its own set."""
    old, adv, ref_logp, online_ref = token_inputs
    tok_exp, pef_flag = masks[0], masks[1]
    lp0 = logp.detach()

    def fill(x, where):
        return lp0 if x is None else torch.where(where, x, lp0)

    return fill(old, tok_exp), adv, fill(ref_logp, pef_flag), fill(online_ref, tok_exp)


class _ChunkedTorchLoss(torch.autograd.Function):
    """The hybrid loss on the chunked torch path with its gradient computed during the forward pass.

    Each token's loss depends on its own log-prob only (the aggregation weights are fixed by the masks), so once a
    chunk's logits give its log-probs, the per-token derivatives (reference math, local autograd) and the chunk's
    dlogit, dh and dW follow at once: three matmuls per chunk and no recompute in backward, which only scales the
    stored gradients by the upstream scalar."""

    @staticmethod
    def forward(ctx, h, weight, bias, safe_t, valid, inv_temp, post, need_entropy, need_grad, token_inputs, masks,
                cfg):
        from .reference import head_slope
        from .linear_logprob import (_tile_logits, chunk_accumulate_grads, chunk_dlogits_, chunk_stats_, chunks,
                                     compute_dtype, grad_buffers, rows_with_loss, scatter_rows)
        rows, _ = rows_with_loss(valid)
        n_all = h.shape[0]
        if rows is not None:  # rows without loss never enter a matmul
            h, safe_t, valid = h.index_select(0, rows), safe_t[rows], valid[rows]
            token_inputs = [None if x is None else x[rows] for x in token_inputs]
            masks = [m[rows] for m in masks]
        N, V = h.shape[0], weight.shape[0]
        cdt = compute_dtype(h.dtype)
        logp = torch.zeros(N, dtype=cdt, device=h.device)
        entropy = torch.zeros(N, dtype=cdt, device=h.device) if need_entropy else None
        parts = {k: [] for k in ("contrib", "ratio", "flags", "kl", "div")}
        dh = torch.zeros_like(h) if need_grad else None
        dW, db = grad_buffers(weight, bias, cdt) if need_grad else (None, None)
        w_ent = -cfg["entropy_coef"] * masks[3].to(cdt) if cfg["entropy_coef"] != 0 else None
        for c in chunks(N, V, cdt):
            z = _tile_logits(h[c], weight, bias, slice(None), inv_temp, cdt, post=post)
            # softcap: the slope d z / d a, kept from z before chunk_stats_ overwrites it (one more [rows, V] buffer)
            slope = head_slope(z, inv_temp, post) if need_grad and post is not None else None
            z_target, lse, S, e_scale = chunk_stats_(z, safe_t[c], need_entropy)
            zero = torch.zeros_like(lse)
            lp = torch.where(valid[c], z_target - lse, zero).detach().requires_grad_()
            logp[c] = lp.detach()
            if need_entropy:
                entropy[c] = torch.where(valid[c], lse - S, zero)
            chunk_in = [None if x is None else x[c] for x in token_inputs]
            chunk_masks = [m[c] for m in masks]
            with torch.enable_grad():
                out = _torch_token_loss(lp, *_fill_inputs(lp, chunk_in, chunk_masks), chunk_masks[1],
                                        chunk_masks[2], cfg)
                (g_logp,) = torch.autograd.grad(out[0].sum(), lp) if need_grad else (None,)
            for k, v in zip(parts, out):
                parts[k].append(v.detach())
            if need_grad:
                dz = chunk_dlogits_(z, safe_t[c], lse, S, e_scale, torch.where(valid[c], g_logp, zero),
                                    None if w_ent is None else w_ent[c], inv_temp if slope is None else 1.0)
                if slope is not None:
                    dz.mul_(slope)
                    del slope
                chunk_accumulate_grads(dz, h[c], valid[c], weight, dh[c], dW, db)
                del dz
            del z  # before the next chunk's buffer is allocated, not after: one [rows, V] buffer alive, not two
        contrib, ratio, flags, kl, div = (torch.cat(parts[k]) for k in parts)
        loss = contrib.sum()
        if w_ent is not None:
            loss = loss + _weighted_sum(w_ent, entropy)
        if rows is not None:  # back to every row: what a row without loss gives (ratio 1, everything else 0)
            logp, contrib, flags, kl, div = (scatter_rows(x, rows, n_all) for x in (logp, contrib, flags, kl, div))
            ratio = scatter_rows(ratio, rows, n_all, 1.0)
            entropy = None if entropy is None else scatter_rows(entropy, rows, n_all)
            dh = None if dh is None else scatter_rows(dh, rows, n_all)
        if need_grad:  # kept on ctx, not saved: backward hands them out (scaled) exactly once
            ctx.grads = (dh, dW.to(weight.dtype), None if db is None else db.to(bias.dtype))
        ctx.mark_non_differentiable(logp, contrib, ratio, flags, kl, div, *([entropy] if need_entropy else []))
        return loss, logp, entropy, contrib, ratio, flags, kl, div

    @staticmethod
    def backward(ctx, g_loss, *_):
        if getattr(ctx, "grads", None) is None:
            raise RuntimeError("FusedLinearDPHLoss (impl='torch') supports one backward per forward: its gradients "
                               "are computed in the forward pass and handed out once")
        grads, ctx.grads = ctx.grads, None
        # In place: a second copy of dW would double this path's largest buffer.
        dh, dW, db = (None if x is None else x.mul_(g_loss.to(x.dtype)) for x in grads)
        return dh, dW, db, *([None] * 9)


def _chunked_torch_loss(hidden, weight, bias, tgt, cfg, head, need_entropy, token_inputs, masks):
    from .linear_logprob import flat_linear_inputs
    h, w, safe_t, valid = flat_linear_inputs(hidden, weight, tgt, cfg["ignore_index"])
    pre, post = head
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad or
                                             (bias is not None and bias.requires_grad))
    return _ChunkedTorchLoss.apply(h, w, bias, safe_t, valid, pre, post, need_entropy, need_grad, token_inputs,
                                   masks, cfg)


def _weighted_sum(w, x):
    """sum(w * x) over the entries with w != 0 (so a NaN / inf where w == 0 never reaches the sum)."""
    return torch.where(w != 0, w * x, torch.zeros_like(x)).sum()


def _split_normalizer(normalizer):
    if normalizer is None:
        return None, None
    if isinstance(normalizer, dict):
        unknown = set(normalizer) - {"exp", "pef"}
        if unknown:
            raise ValueError(f"normalizer dict keys must be 'exp' and/or 'pef', got {sorted(unknown)}")
        parts = normalizer.get("exp"), normalizer.get("pef")
    else:
        parts = normalizer, normalizer
    for p in parts:
        if p is not None and not float(p) > 0:
            raise ValueError(f"normalizer must be > 0, got {p}")
    return parts


class FusedLinearDPHLoss(torch.nn.Module):
    """The DPH-RL hybrid loss (and every baseline of the paper as a configuration). See the module docstring.

    Args:
        divergence: generator for D_pef rows ("fkl", "fkl_k1", "js", "alpha", "rkl", "tv", "hellinger") or None
            for plain GRPO/DAPO (then no row may be is_pef).
        eta: weight of L_pef.  alpha: for divergence="alpha".  divergence_clamp: optional (lo, hi) clamp of f.
        clip_low, clip_high, dual_clip: PPO ratio clip 1 - clip_low .. 1 + clip_high; dual clip c (None = off).
        kl_beta, kl_estimator: a KL penalty beta * k(logp, online_ref_logp) on D_exp tokens, on the policy's own
            samples. Its gradient depends on the estimator (PRESETS' comment): "k3" (verl's low_var_kl, TRL's beta,
            the paper's "RKL") gives the forward-KL gradient grad KL(pi_ref || pi_theta) in expectation, "k2" the
            reverse-KL gradient grad KL(pi_theta || pi_ref), "k1" none in expectation.
        entropy_coef: adds -entropy_coef * H on D_exp tokens (computes the entropy in the same pass).
        loss_agg: "token-mean" | "seq-mean-token-mean" | "seq-mean-token-sum" | "seq-mean-token-sum-norm".
        norm_length: the constant length of "seq-mean-token-sum-norm" (default: T of the batch).
        log_entropy: compute the entropy for the metrics even when entropy_coef == 0.
        temperature, ignore_index, impl: as in dk.linear_logprob.
        divergence_mode: "sampled" (the generator at the stored tokens; the paper) or "exact" (the divergence summed
            over the whole vocabulary against a reference head, dk.linear_f_divergence; needs ref_hidden/ref_weight).
        softcap, logit_scale: the policy head's final-logit softcap and logit scale, as in dk.linear_logprob.
        ref_softcap, ref_logit_scale: the same for the reference head of divergence_mode="exact".
        policy_loss: the D_exp loss, as TRL 1.16 defines each (reference.POLICY_LOSSES): "ppo" (PPO-clip; TRL's
            grpo / bnpo / dr_grpo / dapo / luspo differ only in loss_agg), "cispo" (the IS weight min(r, cap) as a
            constant times -A log pi; cap = cispo_max_weight, default 1 + clip_high), "sapo" (a soft sigmoid gate with
            sapo_temperature_pos / _neg by the sign of A), "vespo" (-phi(w) A log pi with the gamma weight phi of the
            sequence's IS ratio w; vespo_k_pos / _lambda_pos / _k_neg / _lambda_neg).
        importance_sampling_level: "token" or "sequence" (GSPO: each token's log-ratio replaced by its sequence's
            mean over the D_exp tokens). Sequence-level ratios and VESPO need per-sequence sums before any per-token
            gradient, so on the CPU they take linear_logprob's forward + backward (four matmuls, the two-pass route)
            instead of the one-pass chunked loss; the memory stays linear_logprob's.
        process_group, vocab_size: a vocab-parallel lm_head (dph_kernels.distributed, as in dk.linear_logprob):
            weight / bias (and ref_weight / ref_bias) are this rank's shard, everything else the same on every
            rank; the loss and metrics are the whole-vocabulary ones on every rank, hidden's gradient is complete
            on every rank. On the torch path this takes linear_logprob's forward + backward (four matmuls) instead
            of the one-pass chunked loss.
    """

    def __init__(self, divergence="js", eta=0.2, alpha=0.5, clip_low=0.2, clip_high=0.28, dual_clip=3.0,
                 kl_beta=0.0, kl_estimator="k3", entropy_coef=0.0, loss_agg="token-mean", temperature=1.0,
                 ignore_index=-100, impl="auto", divergence_clamp=None, norm_length=None, log_entropy=False,
                 divergence_mode="sampled", softcap=None, logit_scale=1.0, ref_softcap=None, ref_logit_scale=1.0,
                 process_group=None, vocab_size=None, policy_loss="ppo", importance_sampling_level="token",
                 sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, vespo_k_pos=2.0, vespo_lambda_pos=3.0,
                 vespo_k_neg=3.0, vespo_lambda_neg=2.0, cispo_max_weight=None):
        super().__init__()
        if policy_loss not in ref.POLICY_LOSSES:
            raise ValueError(f"policy_loss must be one of {ref.POLICY_LOSSES}, got {policy_loss!r}")
        if importance_sampling_level not in ref.IS_LEVELS:
            raise ValueError(f"importance_sampling_level must be one of {ref.IS_LEVELS}, got "
                             f"{importance_sampling_level!r}")
        for name, v in (("sapo_temperature_pos", sapo_temperature_pos), ("sapo_temperature_neg", sapo_temperature_neg),
                        ("vespo_lambda_pos", vespo_lambda_pos), ("vespo_lambda_neg", vespo_lambda_neg),
                        ("cispo_max_weight", 1.0 if cispo_max_weight is None else cispo_max_weight)):
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {v}")
        if divergence is not None:
            _check_kind(divergence, alpha)
        _check_clip(clip_low, clip_high, dual_clip)
        _check_agg(loss_agg)
        if kl_estimator not in ref.KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {ref.KL_ESTIMATORS}, got {kl_estimator!r}")
        if not (math.isfinite(eta) and eta >= 0):
            raise ValueError(f"eta must be >= 0, got {eta}")
        if divergence_mode not in ("sampled", "exact"):
            raise ValueError(f"divergence_mode must be 'sampled' or 'exact', got {divergence_mode!r}")
        if divergence_clamp is not None and not divergence_clamp[0] < divergence_clamp[1]:
            raise ValueError(f"divergence_clamp must be (lo, hi) with lo < hi, got {divergence_clamp}")
        _checks.check_temperature(temperature)
        _checks.check_impl(impl)
        softcap, logit_scale = _checks.check_head(softcap, logit_scale)
        ref_softcap, ref_logit_scale = _checks.check_head(ref_softcap, ref_logit_scale, "ref_")
        if process_group is None and vocab_size is not None:
            raise ValueError("vocab_size is only used with process_group (a vocab-parallel head)")
        if process_group is not None and impl == "reference":
            raise ValueError("process_group needs impl 'auto', 'torch' or 'triton' (the reference materializes one "
                             "head)")
        self.vp = dict(process_group=process_group, vocab_size=vocab_size) if process_group is not None else {}
        self.cfg = dict(divergence=divergence, eta=float(eta), alpha=float(alpha), clip_low=float(clip_low),
                        clip_high=float(clip_high), dual_clip=None if dual_clip is None else float(dual_clip),
                        kl_beta=float(kl_beta), kl_estimator=kl_estimator, entropy_coef=float(entropy_coef),
                        loss_agg=loss_agg, temperature=float(temperature), ignore_index=ignore_index, impl=impl,
                        divergence_clamp=None if divergence_clamp is None else tuple(map(float, divergence_clamp)),
                        norm_length=norm_length, log_entropy=log_entropy, divergence_mode=divergence_mode,
                        softcap=softcap, logit_scale=logit_scale, ref_softcap=ref_softcap,
                        ref_logit_scale=ref_logit_scale, policy_loss=policy_loss,
                        importance_sampling_level=importance_sampling_level,
                        sapo_temperature_pos=float(sapo_temperature_pos),
                        sapo_temperature_neg=float(sapo_temperature_neg), vespo_k_pos=float(vespo_k_pos),
                        vespo_lambda_pos=float(vespo_lambda_pos), vespo_k_neg=float(vespo_k_neg),
                        vespo_lambda_neg=float(vespo_lambda_neg),
                        cispo_max_weight=None if cispo_max_weight is None else float(cispo_max_weight))

    @classmethod
    def preset(cls, name, **overrides):
        """A PRESETS entry with the paper's hyper-parameters; kwargs override. "kl-k3" is the paper's "RKL" row (a
        forward-KL gradient, also reachable as "rkl"); "rkl-k2" and "dph-rkl" are true reverse-KL baselines."""
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
        return cls(**{**PRESETS[name], **overrides})

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.cfg.items())

    def forward(self, hidden, weight, targets, loss_mask, is_pef, *, advantages=None, old_logp=None, ref_logp=None,
                online_ref_logp=None, bias=None, normalizer=None, ref_hidden=None, ref_weight=None, ref_bias=None):
        """The hybrid loss of one (micro-)batch of B sequences of T response positions.

        Position t of row b scores token targets[b, t] from hidden[b, t]: the hidden state that *predicts* it, so
        for a sequence of ids x the hidden states are those of x[:-1] and targets = x[1:] (the next tokens, shifted by
        one); for a response after a prompt, hidden = the states at positions P-1 .. P+R-2 and targets = the R
        response ids. Only positions with loss_mask set (and targets != ignore_index) count.

        Args:
            hidden: (B, T, D) float32 / bfloat16 / float16 / float64, the last hidden states (requires grad).
            weight: (V, D), the lm_head weight; same dtype and device as hidden.
            targets: (B, T) integer, the next tokens; values in [0, V) or ignore_index.
            loss_mask: (B, T) bool (or 0 / 1 integer or float; any other value is an error): the response tokens.
            is_pef: (B,) bool; True = a stored D_pef sample (divergence term), False = a D_exp rollout (PPO term).
            advantages: (B,) or (B, T) float, per sequence / token; required when a D_exp row has loss tokens.
            old_logp: (B, T) float, log pi_old of the D_exp tokens; None = on-policy (ratio 1, the loss's own
                detached log-probs).
            ref_logp: (B, T) float, the stored log pi_ref of the D_pef tokens; required for D_pef rows
                (divergence_mode "sampled").
            online_ref_logp: (B, T) float, log pi_ref of the D_exp tokens for the reverse-KL penalty (kl_beta != 0).
            bias: optional (V,) lm_head bias.
            normalizer: the step's token count (a number, or {"exp": n, "pef": m}) when a step is split into
                micro-batches, so that the summed micro-batch losses equal one big batch's (see dk.aggregate).
            ref_hidden (B, T, D_ref), ref_weight (V, D_ref), ref_bias (V,): the reference head, only for
                divergence_mode="exact".
            Outside their own rows the values of old_logp / ref_logp / online_ref_logp / advantages are never read
            (padding may hold anything, even NaN). Every tensor must be on hidden's device.

        Returns:
            DPHLossOutput(loss, metrics, logp): loss a 0-dim tensor (L_exp + eta * L_pef; differentiable w.r.t.
            hidden, weight, bias), metrics a dict of floats (loss terms, clip fractions, ratio, approx_kl,
            divergence, token counts, entropy when computed), logp the (B, T) fp32 detached log pi_theta of the
            targets (0 at unmasked positions) - log pi_old for a later PPO epoch.
        """
        cfg = self.cfg
        B, T, tok_exp, tok_pef, tok, shard = self._check(hidden, weight, targets, loss_mask, is_pef, bias,
                                                  (ref_hidden, ref_weight, ref_bias))
        exact = cfg["divergence_mode"] == "exact"
        compiling = torch.compiler.is_compiling()
        if compiling:  # no host sync: which sets have tokens is not read back, so every input a set needs is required
            has_exp, has_pef = True, cfg["divergence"] is not None
        else:
            has_exp, has_pef = bool(tok_exp.any()), bool(tok_pef.any())
        if has_exp and advantages is None:
            raise ValueError("advantages is required: the batch has D_exp (is_pef=False) tokens")
        if has_exp and cfg["kl_beta"] != 0 and online_ref_logp is None:
            raise ValueError("online_ref_logp is required when kl_beta != 0 and the batch has D_exp tokens")
        if has_pef and cfg["divergence"] is None:
            raise ValueError("is_pef marks rows with loss tokens but divergence=None (plain GRPO/DAPO has no D_pef)")
        if has_pef and not exact and ref_logp is None:
            raise ValueError("ref_logp is required: the batch has D_pef (is_pef=True) tokens")
        if has_pef and exact and (ref_hidden is None or ref_weight is None):
            raise ValueError("divergence_mode='exact' needs ref_hidden and ref_weight for the D_pef rows")

        device = hidden.device
        need_entropy = cfg["entropy_coef"] != 0 or cfg["log_entropy"]
        tgt = torch.where(tok, targets, torch.full_like(targets, cfg["ignore_index"]))
        # Inputs the math reads outside their own set are later replaced by log pi_theta itself (ratio 1, finite),
        # so padding (even NaN / -inf) never reaches a value or a gradient.
        checked = not compiling  # stored log-probs are value-checked in eager mode only
        old = self._pick("old_logp", old_logp, targets, tok_exp if checked else None)
        refl = self._pick("ref_logp", ref_logp, targets, None if exact or not checked else tok_pef)
        oref = self._pick("online_ref_logp", online_ref_logp, targets,
                          tok_exp if cfg["kl_beta"] and checked else None)
        if exact:
            refl = None  # the exact divergence reads the reference head, not stored log-probs
        if not cfg["kl_beta"]:
            oref = None
        adv = torch.zeros((B, T), dtype=torch.float32, device=device)
        if advantages is not None:
            from .losses import broadcast_advantages
            adv = torch.where(tok_exp, broadcast_advantages(advantages, (B, T), device, "hidden").float(), adv)

        norm_exp, norm_pef = _split_normalizer(normalizer)
        w_exp = ref.aggregation_weights(tok_exp, cfg["loss_agg"], norm_exp, cfg["norm_length"])
        w_pef = cfg["eta"] * ref.aggregation_weights(tok_pef, cfg["loss_agg"], norm_pef, cfg["norm_length"])
        w_tok = torch.where(tok_pef, torch.zeros_like(w_pef) if exact else w_pef, w_exp)
        pef_tok_flag = tok_pef & (not exact)
        token_inputs = [None if x is None else x.reshape(-1) for x in (old, adv, refl, oref)]
        masks = [x.reshape(-1) for x in (tok_exp, pef_tok_flag, w_tok, w_exp)]

        impl = _checks.resolve_impl(cfg["impl"], device)
        # Under torch.compile the log-probs come from one custom op and the token math is traced: no chunked
        # autograd.Function, no Triton elementwise launch.
        rows_needed = _needs_rows(cfg)
        one_pass = impl == "torch" and not self.vp and not rows_needed and not compiling
        if one_pass:
            # CPU path: the gradient is computed in the forward pass, chunk by chunk (three matmuls, no recompute).
            loss, logp, entropy, contrib, ratio, flags, kl, div = _chunked_torch_loss(
                hidden, weight, bias, tgt, cfg, self._head(), need_entropy, token_inputs, masks)
        elif impl == "reference":  # the materializing test path, with its own checks
            out = linear_logprob(hidden, weight, tgt, bias=bias, temperature=cfg["temperature"],
                                 ignore_index=cfg["ignore_index"], return_entropy=need_entropy, impl=impl,
                                 softcap=cfg["softcap"], logit_scale=cfg["logit_scale"])
            logp, entropy = out if need_entropy else (out, None)
        else:
            logp, entropy = logprob_core(hidden, weight, tgt, bias, *self._head(), cfg["ignore_index"], need_entropy,
                                         impl, shard)
        if not one_pass:
            flat_logp = logp.reshape(-1)
            args = _fill_inputs(flat_logp, token_inputs, masks)
            if impl == "triton" and cfg["policy_loss"] == "ppo" and not rows_needed and not compiling:
                contrib, ratio, flags, kl, div = _TritonTokenLoss.apply(
                    flat_logp, *args, masks[1].to(torch.int8), masks[2].contiguous(), cfg)
            elif rows_needed:  # sequence aggregates: the per-token math on (B, T), differentiated by autograd
                contrib, ratio, flags, kl, div = _torch_token_loss(
                    logp.reshape(B, T), *(None if x is None else x.reshape(B, T) for x in args),
                    masks[1].reshape(B, T), masks[2].reshape(B, T), cfg, exp_mask=tok_exp)
            else:
                contrib, ratio, flags, kl, div = _torch_token_loss(flat_logp, *args, masks[1], masks[2], cfg)
            loss = contrib.sum()
            if cfg["entropy_coef"] != 0:
                loss = loss - cfg["entropy_coef"] * _weighted_sum(w_exp, entropy)
        contrib, ratio, flags, kl, div = (x.reshape(B, T) for x in (contrib, ratio, flags, kl, div))
        logp = logp.reshape(B, T).float() if hidden.dtype != torch.float64 else logp.reshape(B, T)
        entropy = None if entropy is None else entropy.reshape(B, T)
        lp0 = logp.detach()
        old = lp0 if old is None else torch.where(tok_exp, old, lp0)  # for the metrics
        if exact and has_pef and impl == "reference":  # the materializing test path, with its own checks
            from .linear_divergence import linear_f_divergence
            div = linear_f_divergence(hidden, weight, ref_hidden, ref_weight, kind=cfg["divergence"],
                                      alpha=cfg["alpha"], bias=bias, ref_bias=ref_bias,
                                      temperature=cfg["temperature"], mask=tok_pef, impl=impl,
                                      softcap=cfg["softcap"], logit_scale=cfg["logit_scale"],
                                      ref_softcap=cfg["ref_softcap"], ref_logit_scale=cfg["ref_logit_scale"])
        elif exact and has_pef:
            from .linear_divergence import f_divergence_core
            heads = (*self._head(), *ref.head_factors(cfg["ref_softcap"], cfg["ref_logit_scale"],
                                                      cfg["temperature"]))
            div = f_divergence_core(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, tok_pef, heads,
                                    cfg["divergence"], cfg["alpha"], impl, shard=shard)
        if exact and has_pef:
            if cfg["divergence_clamp"] is not None:
                div = torch.clamp(div, *cfg["divergence_clamp"])
            loss = loss + _weighted_sum(w_pef, div)
            div = div.detach()

        metrics = self._metrics(loss, contrib, logp, old, ratio, flags, kl, div, entropy, tok, tok_exp, tok_pef,
                                is_pef, w_pef, exact)
        if not compiling:  # Python numbers, read back in one transfer; under compile they stay 0-dim tensors
            values = torch.stack([v.detach().double() for v in metrics.values()]).tolist()
            metrics = {k: int(v) if k.startswith("n_") else v for k, v in zip(metrics, values)}
        return DPHLossOutput(loss=loss, metrics=metrics, logp=lp0)

    # ---------------------------------------------------------------------------------------------------- helpers
    def _check(self, hidden, weight, targets, loss_mask, is_pef, bias, ref):
        """Every input, once: hidden (B, T, D), weight, bias, targets (B, T) and their range, loss_mask, is_pef (B,),
        the reference head (when given); the paths below trust them. Returns B, T and the token masks."""
        _checks.check_linear_inputs(hidden, weight, targets, bias, allow_fp64=True, ndim=3)
        B, T, _ = hidden.shape
        from .distributed import vocab_shard
        shard = vocab_shard(self.vp.get("process_group"), weight, self.vp.get("vocab_size"))
        if not torch.compiler.is_compiling():  # a value check (a host sync): eager only
            _checks.check_targets_range(targets, weight.shape[0] if shard is None else shard.vocab_size,
                                        self.cfg["ignore_index"])
        loss_mask = _checks.check_mask("loss_mask", loss_mask, shape=(B, T), shape_of="targets", device=hidden.device)
        _checks.check_tensor("is_pef", is_pef, shape=(B,), shape_of="hidden's batch", device=hidden.device,
                             dtypes=(torch.bool,))
        ref_hidden, ref_weight, ref_bias = ref
        given = [n for n, x in zip(("ref_hidden", "ref_weight", "ref_bias"), ref) if x is not None]
        if self.cfg["divergence_mode"] != "exact" and given:
            raise ValueError(f"{given[0]} is only used with divergence_mode='exact' (this loss is 'sampled')")
        if given:
            if ref_hidden is None or ref_weight is None:
                raise ValueError("divergence_mode='exact' needs both ref_hidden and ref_weight")
            _checks.check_ref_head(hidden, weight.shape[0], ref_hidden, ref_weight, ref_bias, allow_fp64=True)
        tok = loss_mask & (targets != self.cfg["ignore_index"])
        tok_pef = tok & is_pef[:, None]
        return B, T, tok & ~is_pef[:, None], tok_pef, tok, shard

    def _head(self):
        """The policy head's (pre, post) factors (reference.head_factors)."""
        return ref.head_factors(self.cfg["softcap"], self.cfg["logit_scale"], self.cfg["temperature"])

    @staticmethod
    def _pick(name, x, targets, used=None):
        """A per-token float input (B, T) on hidden's device, as fp32 without grad (None stays None); a stored
        log-prob at the positions where it is `used` must be finite and <= 0 (_checks.check_logprobs)."""
        if x is None:
            return None
        _checks.check_tensor(name, x, floating=True, shape=targets.shape, shape_of="targets", device=targets.device)
        x = x.detach().to(torch.float32)
        if used is not None:
            _checks.check_logprobs(name, x, used)
        return x

    def _metrics(self, loss, contrib, logp, old, ratio, flags, kl, div, entropy, tok, tok_exp, tok_pef, is_pef,
                 w_pef, exact):
        """0-dim tensors (no host sync); forward turns them into Python numbers in eager mode."""
        c = contrib.detach()
        mean, zero = masked_mean_tensor, torch.zeros((), device=c.device)
        m = {
            "loss": loss.detach(),
            "loss_exp": torch.where(tok_exp, c, torch.zeros_like(c)).sum(),
            "n_tokens_exp": tok_exp.sum(), "n_tokens_pef": tok_pef.sum(),
            "n_seqs_exp": tok_exp.any(-1).sum(), "n_seqs_pef": tok_pef.any(-1).sum(),
            "clipfrac_low": mean((flags & 1).bool().float(), tok_exp),
            "clipfrac_high": mean((flags & 2).bool().float(), tok_exp),
            "clipfrac_dual": mean((flags & 4).bool().float(), tok_exp),
            "ratio_mean": mean(ratio, tok_exp),
            "approx_kl": mean(ref.kl_estimate(old, logp.detach(), "k3"), tok_exp),
            "divergence_mean": mean(div, tok_pef),
            "divergence_max": torch.where(tok_pef.any(), torch.where(tok_pef, div, float("-inf")).max(), zero),
        }
        # L_pef before eta, from the same weights the loss used.
        eta = self.cfg["eta"]
        m["loss_pef"] = _weighted_sum(w_pef, div) / eta if eta else zero
        if self.cfg["kl_beta"] != 0:
            m["kl_penalty_mean"] = mean(kl, tok_exp)
        if entropy is not None:
            m["entropy_mean"] = mean(entropy.detach(), tok)
            m["entropy_mean_exp"] = mean(entropy.detach(), tok_exp)
        return m
