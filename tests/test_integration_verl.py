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


def test_unsupported_aggregation_is_named():
    logp, _, data, mask = _batch()
    cfg = FSDPActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=2, ppo_mini_batch_size=4, rollout_n=1,
                          use_dynamic_bsz=False)
    with pytest.raises(ValueError, match="token-sum"):
        dkverl.dph_ppo_policy_loss(data["old_log_probs"], logp, data["advantages"], mask, "token-sum", cfg)
