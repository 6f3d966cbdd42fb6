"""dph_kernels.integrations.verl against the real verl (0.9.1, its own venv: `make test-verl`; skipped elsewhere).

* `import verl` loads the plug-in through the `verl.plugins` entry point: verl's registry finds "dph_ppo";
* verl's own `ppo_loss` on a TensorDict batch with loss_mode="dph_ppo" gives the same loss, gradients and metrics as
  verl's "vanilla" PPO-clip, for every loss_agg_mode dk expresses, with clip-higher, dual clip, rollout IS weights and
  global-batch normalisation (dp_size > 1).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("verl", reason="verl is not installed here (its own venv: make test-verl)")

from tensordict import TensorDict  # noqa: E402
from verl.trainer.ppo.core_algos import get_policy_loss_fn  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.config.actor import FSDPActorConfig, PolicyLossConfig  # noqa: E402
from verl.workers.utils.losses import ppo_loss  # noqa: E402

from dph_kernels.integrations import verl as dkverl  # noqa: E402


def test_entry_point_registers_the_loss():
    assert get_policy_loss_fn("dph_ppo") is dkverl.dph_ppo_policy_loss
    for name, fn in dkverl.NEWER_LOSSES.items():
        assert get_policy_loss_fn(name) is fn


def _batch(B=4, P=3, R=7, seed=0, with_is=False):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(B, R, generator=g) * 3).requires_grad_()
    old = logp.detach() + 1.0 * torch.randn(B, R, generator=g)  # off-policy: clips and the dual clip bind
    resp_len = torch.tensor([R, R - 2, 1, R - 3][:B])
    resp_mask = (torch.arange(R)[None] < resp_len[:, None]).float()
    attn = torch.cat([torch.ones(B, P, dtype=torch.long), resp_mask.long()], 1)
    # verl's model output: log-probs packed over the real tokens of each sequence, shifted by one
    pieces, off = [], 0
    for i in range(B):
        n = P + int(resp_len[i])
        row = torch.zeros(n)
        pieces.append(torch.cat([row[:P - 1], logp[i, :int(resp_len[i])], row[-1:]]))
        off += n
    packed = torch.cat(pieces)
    fields = dict(prompts=torch.ones(B, P, dtype=torch.long), responses=torch.ones(B, R, dtype=torch.long),
                  attention_mask=attn, response_mask=resp_mask, old_log_probs=old,
                  advantages=torch.randn(B, R, generator=g) * 2)
    if with_is:
        fields["rollout_is_weights"] = torch.rand(B, R, generator=g) * 2
    data = TensorDict(fields, batch_size=B)
    return logp, packed, data, resp_mask


@pytest.mark.parametrize("with_is", [False, True])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_verl_ppo_loss_with_dph_ppo_equals_vanilla(agg, with_is):
    results = {}
    for mode in ("vanilla", "dph_ppo"):
        logp, packed, data, mask = _batch(with_is=with_is)
        B = mask.shape[0]
        tu.assign_non_tensor(data, dp_size=2, batch_num_tokens=int(mask.sum()) * 2, global_batch_size=2 * B)
        cfg = FSDPActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=2, ppo_mini_batch_size=4, rollout_n=1,
                              use_dynamic_bsz=False, loss_agg_mode=agg, clip_ratio_low=0.2, clip_ratio_high=0.28,
                              clip_ratio_c=1.5, loss_scale_factor=5 if agg == "seq-mean-token-sum-norm" else None,
                              policy_loss=dataclasses.replace(PolicyLossConfig(), loss_mode=mode))
        loss, metrics = ppo_loss(cfg, {"log_probs": packed}, data)
        loss.backward()
        results[mode] = (float(loss.detach()), logp.grad.clone(),
                         {k: float(torch.as_tensor(v.values[0])) for k, v in metrics.items()})
    (lv, gv, mv), (ld, gd, md) = results["vanilla"], results["dph_ppo"]
    assert abs(lv) > 1e-4 and float(gv.abs().max()) > 1e-3
    assert ld == pytest.approx(lv, rel=1e-6, abs=1e-7)
    torch.testing.assert_close(gd, gv, rtol=1e-5, atol=1e-7)
    for k in ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"):
        assert md[k] == pytest.approx(mv[k], rel=1e-5, abs=1e-7), k
    assert mv["actor/pg_clipfrac"] > 0 and mv["actor/pg_clipfrac_lower"] > 0  # both clips bind in this batch


@pytest.mark.parametrize("with_is", [False, True])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("name", ["gspo", "sapo", "cispo"])
def test_newer_verl_losses_through_dk_equal_verls_own(name, agg, with_is):
    """dph_gspo / dph_sapo / dph_cispo (dk's math) against verl's own gspo / sapo / cispo: loss, gradient, metrics."""
    results = {}
    for mode in (name, f"dph_{name}"):
        logp, packed, data, mask = _batch(with_is=with_is, seed=3)
        if name == "gspo":  # GSPO's sequence ratio clips at 1 +- a few 1e-4 (its paper's setting)
            data["old_log_probs"] = logp.detach() + 0.001 * torch.randn(logp.shape,
                                                                        generator=torch.Generator().manual_seed(4))
        B = mask.shape[0]
        tu.assign_non_tensor(data, dp_size=2, batch_num_tokens=int(mask.sum()) * 2, global_batch_size=2 * B)
        clip = (3e-4, 4e-4) if name == "gspo" else (0.2, 0.28)
        cfg = FSDPActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=2, ppo_mini_batch_size=4, rollout_n=1,
                              use_dynamic_bsz=False, loss_agg_mode=agg, clip_ratio_low=clip[0], clip_ratio_high=clip[1],
                              policy_loss=dataclasses.replace(PolicyLossConfig(), loss_mode=mode))
        loss, metrics = ppo_loss(cfg, {"log_probs": packed}, data)
        loss.backward()
        results[mode] = (float(loss.detach()), logp.grad.clone(),
                         {k: float(torch.as_tensor(v.values[0])) for k, v in metrics.items()})
    (lv, gv, mv), (ld, gd, md) = results[name], results[f"dph_{name}"]
    assert abs(lv) > 1e-4 and float(gv.abs().max()) > 1e-3
    assert ld == pytest.approx(lv, rel=1e-6, abs=1e-7)
    torch.testing.assert_close(gd, gv, rtol=1e-5, atol=1e-7)
    for k in ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"):
        assert md[k] == pytest.approx(mv[k], rel=1e-5, abs=1e-7), k
    if name != "sapo":
        assert mv["actor/pg_clipfrac"] > 0  # the clip binds in this batch


def test_unsupported_aggregation_is_named():
    logp, _, data, mask = _batch()
    cfg = FSDPActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=2, ppo_mini_batch_size=4, rollout_n=1,
                          use_dynamic_bsz=False)
    with pytest.raises(ValueError, match="token-sum"):
        dkverl.dph_ppo_policy_loss(data["old_log_probs"], logp, data["advantages"], mask, "token-sum", cfg)


def test_dph_whole_loss_matches_fused_dph_loss():
    """verl whole loss (log-probs from dk.linear_logprob, packed as verl packs them) == dk.FusedLinearDPHLoss on the
    same hidden states: loss and gradients, with D_exp and D_pef rows mixed."""
    import dph_kernels as dk

    B, P, R, D, V = 4, 3, 6, 16, 50
    g = torch.Generator().manual_seed(1)
    h = torch.randn(B, R, D, generator=g, requires_grad=True)
    W = torch.randn(V, D, generator=g) * 0.5
    y = torch.randint(0, V, (B, R), generator=g)
    mask = torch.ones(B, R)
    mask[1, 4:] = 0
    is_pef = torch.tensor([False, False, True, True])
    adv = torch.randn(B, R, generator=g)
    with torch.no_grad():
        lp0 = dk.linear_logprob(h, W, y)
    old = lp0 + 0.3 * torch.randn(B, R, generator=g)
    ref = (lp0 - 0.5 * torch.rand(B, R, generator=g)).clamp(max=0)
    fused = dk.FusedLinearDPHLoss(divergence="js", eta=0.3, clip_low=0.2, clip_high=0.28, dual_clip=3.0,
                                  loss_agg="token-mean", impl="torch")
    want = fused(h, W, y, mask.bool(), is_pef, advantages=adv, old_logp=old, ref_logp=ref)
    (gw,) = torch.autograd.grad(want.loss, h)

    logp = dk.linear_logprob(h, W, y)
    resp_len = mask.sum(-1).long()
    packed = torch.cat([torch.cat([torch.zeros(P - 1), logp[i, :int(resp_len[i])], torch.zeros(1)]) for i in range(B)])
    data = TensorDict(dict(prompts=torch.ones(B, P, dtype=torch.long), responses=y,
                           attention_mask=torch.cat([torch.ones(B, P, dtype=torch.long), mask.long()], 1),
                           response_mask=mask, old_log_probs=old, advantages=adv, is_pef=is_pef,
                           pef_ref_log_prob=ref), batch_size=B)
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=int((mask.bool() & ~is_pef[:, None]).sum()),
                         global_batch_size=2)
    cfg = FSDPActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=2, ppo_mini_batch_size=4, rollout_n=1,
                          use_dynamic_bsz=False, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0)
    loss, metrics = dkverl.make_dph_loss("js", eta=0.3)(cfg, {"log_probs": packed}, data)
    (gv,) = torch.autograd.grad(loss, h)
    assert float(loss.detach()) == pytest.approx(float(want.loss.detach()), rel=1e-5)
    torch.testing.assert_close(gv, gw, rtol=1e-4, atol=1e-6)
    assert metrics["actor/dph_pef_tokens"] == 12 and metrics["actor/dph_divergence_mean"] > 0


def test_forward_patch_gives_verls_logprobs_within_fp32_error():
    """verl's own fused-kernel forward (dense_common.forward_with_torch_backend) on a tiny Llama: with the patch its
    log-probs, entropies and lm_head gradient match verl's FusedLinearForPPO within fp32 error."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from verl.models.transformers.dense_common import forward_with_torch_backend
    from verl.utils.experimental import torch_functional as tf

    cfg = LlamaConfig(vocab_size=301, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    ids = torch.randint(0, 301, (3, 17))
    outs = {}
    for patched in (False, True):
        if patched:
            dkverl.patch_fused_kernels()
        try:
            model.zero_grad()
            o = forward_with_torch_backend(model, input_ids=ids, return_dict=True, temperature=0.7)
            (o.log_probs.sum() + 0.1 * o.entropy.sum()).backward()
            outs[patched] = (o.log_probs.detach(), o.entropy.detach(), model.lm_head.weight.grad.clone(),
                             tf.FusedLinearForPPO)
        finally:
            dkverl.unpatch_fused_kernels()
    (lv, ev, gv, cls_v), (ld, ed, gd, cls_d) = outs[False], outs[True]
    assert cls_d is dkverl.DKFusedLinearForPPO and cls_v is not dkverl.DKFusedLinearForPPO
    assert tf.FusedLinearForPPO is cls_v  # unpatched again
    torch.testing.assert_close(ld, lv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ed, ev, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gd, gv, rtol=1e-4, atol=1e-6)
