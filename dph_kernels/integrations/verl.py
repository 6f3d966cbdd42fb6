"""verl adapter (pinned: verl==0.9.1, in its own environment: it pins transformers < 5.11; `make test-verl`).

`pip install "dph[verl]"` registers this module under verl's `verl.plugins` entry-point group, so `import verl`
loads it and verl's policy-loss registry gains:

    dph_ppo   PPO-clip / GRPO (clip_ratio_low / clip_ratio_high, dual clip clip_ratio_c, rollout_is_weights) through
              dph_kernels' PPO-clip math, with verl's loss_agg_mode and global-batch normalisation.
    dph_gspo, dph_sapo, dph_cispo   verl's gspo / sapo / cispo through dph_kernels' math (NEWER_LOSSES; the
              differences from verl's own, at extreme ratios only, are listed beside _VERL_POLICY).

Enable it from a verl config:  actor_rollout_ref.actor.policy_loss.loss_mode=dph_ppo
(with VERL_USE_EXTERNAL_PLUGINS unset or listing `dph`). rollout_is_weights (>= 0) are folded into the advantages:
PPO-clip, dual clip included, is positively homogeneous in A, so w * loss(A) = loss(w * A).

For DPH-RL rows, `make_dph_loss(divergence="js", eta=0.2)` returns a whole loss with verl's `ppo_loss` signature
`fn(config, model_output, data, dp_group=None) -> (loss, metrics)`, for the actor worker's `set_loss_fn`: rows with
`data["is_pef"]` (B,) True get eta * the f-divergence generator on `data["pef_ref_log_prob"]` (stored log pi_ref,
B x T), a mean over their tokens; the other rows get dph_ppo.

verl's fused-kernel path (`actor_rollout_ref.model.use_fused_kernels=True`, torch backend) builds a
`FusedLinearForPPO` inside each patched model forward; `patch_fused_kernels()` swaps that class for
`DKFusedLinearForPPO`, so the log-probs and entropies come from `dk.linear_logprob` (call it in each worker process
before training; `unpatch_fused_kernels()` restores verl's).
"""
from __future__ import annotations

import torch

from ..linear_logprob import linear_logprob
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


# verl's newer policy losses, as dk's (reference.policy_token_loss), registered as dph_<name>:
#   gspo   PPO-clip of the sequence's mean log-ratio (verl's stop-gradient per-token form has the same values and
#          gradients; verl clamps the log-ratio at +10 where dk clamps at +-20), no dual clip, verl's loss_agg_mode
#   sapo   the soft gate with config.tau_pos / tau_neg; verl aggregates it seq-mean-token-mean whatever loss_agg_mode
#   cispo  the IS weight clamp(r, 1 - clip_ratio_low, 1 + clip_ratio_high) (verl bounds it on both sides; TRL's is
#          one-sided) as a constant times -A log pi
# rollout_is_weights (>= 0) fold into the advantages: each loss is positively homogeneous in A.
_VERL_POLICY = {"gspo": dict(policy_loss="ppo", importance_sampling_level="sequence"),
                "sapo": dict(policy_loss="sapo"), "cispo": dict(policy_loss="cispo")}


def _dk_policy_loss(name, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                    rollout_is_weights):
    from .. import reference as ref
    from ..losses import aggregate

    if config is None:
        raise ValueError("config (verl's ActorConfig) is required: it holds the clip ratios and SAPO's taus")
    clip = config.clip_ratio
    low = config.clip_ratio_low if config.clip_ratio_low is not None else clip
    high = config.clip_ratio_high if config.clip_ratio_high is not None else clip
    cfg = dict(clip_low=low, clip_high=high, dual_clip=None, sapo_temperature_pos=config.get("tau_pos", 1.0),
               sapo_temperature_neg=config.get("tau_neg", 1.05), cispo_min_weight=1 - low,
               cispo_max_weight=1 + high, **_VERL_POLICY[name])
    mask = response_mask.bool()
    adv = advantages if rollout_is_weights is None else advantages * rollout_is_weights
    loss_tok, ratio, lo, hi, _ = ref.policy_token_loss(log_prob, old_log_prob, adv, cfg, mask)
    agg = "seq-mean-token-mean" if name == "sapo" else loss_agg_mode
    info = dict(getattr(config, "global_batch_info", None) or {})
    normalizer, norm_length = _normalizer(agg, mask, **info)
    loss = aggregate(loss_tok, mask, agg, normalizer=normalizer, norm_length=norm_length)
    n = mask.sum().clamp(min=1)

    def masked_mean(x):
        return float(torch.where(mask, x.detach().float(), torch.zeros_like(log_prob)).sum() / n)

    clipped = {"gspo": lo | hi, "sapo": torch.zeros_like(mask),
               "cispo": (ratio < 1 - low) | (ratio > 1 + high)}[name]
    metrics = {"actor/pg_clipfrac": masked_mean(clipped), "actor/ppo_kl": masked_mean(old_log_prob - log_prob),
               "actor/pg_clipfrac_lower": 0.0}
    return loss, metrics


def _verl_loss(name):
    def policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
                    rollout_is_weights=None):
        return _dk_policy_loss(name, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                               rollout_is_weights)

    policy_loss.__name__ = f"dph_{name}_policy_loss"
    policy_loss.__doc__ = f"verl's {name!r} policy loss through dph_kernels' math (verl's signature)."
    return policy_loss


NEWER_LOSSES = {f"dph_{name}": _verl_loss(name) for name in _VERL_POLICY}


def make_dph_loss(divergence="js", eta=0.2, alpha=0.5, divergence_clamp=None):
    """A verl whole loss (ppo_loss's signature) for batches mixing D_exp rows and stored D_pef rows.

    L = dph_ppo over the D_exp rows (verl's loss_agg_mode and normalisation) + eta * token-mean over the D_pef tokens
    of f(exp(logp - pef_ref_log_prob)). Each D_pef row's token-mean is over this rank's D_pef tokens (times dp_size,
    so that DP gradient averaging keeps it a mean)."""
    from ..losses import _check_kind, aggregate, f_divergence

    _check_kind(divergence, alpha)
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0, got {eta}")

    def dph_loss(config, model_output, data, dp_group=None):
        from verl.workers.utils.padding import no_padding_2_padding

        log_prob = no_padding_2_padding(model_output["log_probs"], data)
        dp_size = data["dp_size"] if "dp_size" in data.keys() else 1
        info = {k: data[k] for k in ("dp_size", "batch_num_tokens", "global_batch_size") if k in data.keys()}
        info["loss_scale_factor"] = config.loss_scale_factor
        fields = [k for k in ("response_mask", "old_log_probs", "advantages", "is_pef", "pef_ref_log_prob",
                              "rollout_is_weights") if k in data.keys()]
        d = data.select(*fields).to_padded_tensor()
        mask = d["response_mask"].bool()
        is_pef = d["is_pef"].bool() if "is_pef" in d.keys() else torch.zeros(mask.shape[0], dtype=torch.bool)
        exp_mask, pef_mask = mask & ~is_pef[:, None], mask & is_pef[:, None]
        config.global_batch_info.update(info)
        zeros = torch.zeros_like(log_prob)
        old = torch.where(exp_mask, d["old_log_probs"].to(log_prob.dtype), log_prob.detach())
        pg, metrics = dph_ppo_policy_loss(old, log_prob, torch.where(exp_mask, d["advantages"], zeros), exp_mask,
                                          config.loss_agg_mode, config, d.get("rollout_is_weights", None))
        loss, div_mean = pg, 0.0
        if bool(pef_mask.any()):
            ref = torch.where(pef_mask, d["pef_ref_log_prob"].to(log_prob.dtype), log_prob.detach())
            g = f_divergence(torch.where(pef_mask, log_prob - ref, zeros), divergence, alpha=alpha,
                             clamp=divergence_clamp)
            n = float(pef_mask.sum())
            loss = loss + eta * aggregate(g, pef_mask, "token-mean", normalizer=n / dp_size)
            div_mean = float(torch.where(pef_mask, g.detach(), zeros).sum()) / n
        metrics.update({"actor/pg_loss": float(pg.detach()), "actor/dph_divergence_mean": div_mean,
                        "actor/dph_pef_tokens": int(pef_mask.sum())})
        return loss, metrics

    return dph_loss


class DKFusedLinearForPPO(torch.nn.Module):
    """verl's FusedLinearForPPO interface (hidden_states, vocab_weights, input_ids, temperature) -> (log_probs,
    entropy), computed by dk.linear_logprob (no [tokens x vocab] logits)."""

    def __init__(self, chunk_size: int = 512, impl_backend: str = "torch", impl: str = "auto"):
        super().__init__()
        self.impl = impl  # chunk_size / impl_backend are verl's knobs; dk chooses its own tiles

    def forward(self, hidden_states, vocab_weights, input_ids, temperature=1.0):
        w = vocab_weights if vocab_weights.dtype == hidden_states.dtype else vocab_weights.to(hidden_states.dtype)
        return linear_logprob(hidden_states, w, input_ids.to(torch.int64), temperature=temperature,
                              return_entropy=True, impl=self.impl)


_ORIGINAL = {}


def patch_fused_kernels():
    """Make verl's fused-kernel model forwards use dk.linear_logprob (idempotent)."""
    from verl.utils.experimental import torch_functional as tf

    _ORIGINAL.setdefault("FusedLinearForPPO", tf.FusedLinearForPPO)
    tf.FusedLinearForPPO = DKFusedLinearForPPO


def unpatch_fused_kernels():
    from verl.utils.experimental import torch_functional as tf

    if "FusedLinearForPPO" in _ORIGINAL:
        tf.FusedLinearForPPO = _ORIGINAL.pop("FusedLinearForPPO")


def register():
    """Register dph_ppo in verl's policy-loss registry (idempotent)."""
    from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY, register_policy_loss

    for name, fn in {LOSS_NAME: dph_ppo_policy_loss, **NEWER_LOSSES}.items():
        if name not in POLICY_LOSS_REGISTRY:
            register_policy_loss(name)(fn)


try:  # the entry point imports this module while `import verl` runs
    register()
except ImportError:  # verl absent: the module still imports (register() raises then)
    pass
