"""HF rollout engine on the tiny random-init Llama: the RolloutBatch structure both backends return."""
import pytest
import torch

pytest.importorskip("transformers")

from dph_train.config import ModelConfig, RolloutConfig  # noqa: E402
from dph_train.models import load_model  # noqa: E402
from dph_train.rollout import HFEngine, RolloutBatch, stop_ids  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny():
    return load_model(ModelConfig(name="tiny"), "cpu", verbose=False)


def check_structure(rb: RolloutBatch, prompts: list, n: int, tok, stops: set, max_new: int):
    """The contract of RolloutBatch, shared with the vLLM test."""
    B = len(prompts) * n
    assert len(rb) == B and len(rb.texts) == B and len(rb.finished) == B
    P, R = rb.prompt_ids.shape[1], rb.response_ids.shape[1]
    assert rb.prompt_ids.shape == rb.prompt_mask.shape == (B, P)
    assert rb.response_ids.shape == rb.response_mask.shape == (B, R)
    assert rb.prompt_ids.dtype == rb.response_ids.dtype == torch.long
    assert rb.prompt_mask.dtype == rb.response_mask.dtype == torch.bool
    assert 1 <= R <= max_new
    for i in range(B):
        assert rb.prompt_list(i) == list(prompts[i // n])  # grouped: row i*n + j is prompt i's j-th sample
        pm = rb.prompt_mask[i]
        assert pm[P - len(prompts[i // n]):].all() and not pm[:P - len(prompts[i // n])].any()  # left padded
        rm = rb.response_mask[i]
        L = int(rm.sum())
        assert rm[:L].all() and not rm[L:].any()  # right padded, a prefix
        assert (rb.response_ids[i, L:] == tok.pad_token_id).all()
        resp = rb.response_list(i)
        assert len(resp) == L >= 1
        assert rb.finished[i] == (resp[-1] in stops)  # finished <=> it ends with its stop token
        assert all(t not in stops for t in resp[:-1])  # nothing after the first stop token
        if not rb.finished[i]:
            assert L == max_new
        assert rb.texts[i] == tok.decode(resp, skip_special_tokens=True)


def test_hf_engine_structure_and_grouping(tiny):
    model, tok = tiny
    eng = HFEngine(model, tok, RolloutConfig(max_new_tokens=7, batch_size=5), ModelConfig(), CPU)
    prompts = [[1, 9690, 198, 2683], [1, 4093], [1, 520, 9531, 198, 33, 34, 27]]
    torch.manual_seed(0)
    rb = eng.generate(prompts, n=3, temperature=1.0, top_p=0.9, desc=False)
    check_structure(rb, prompts, 3, tok, stop_ids(model, tok), 7)
    assert model.training is False or model.training is True  # mode is restored, whatever it was


def test_greedy_is_deterministic_and_sampling_is_not(tiny):
    model, tok = tiny
    eng = HFEngine(model, tok, RolloutConfig(max_new_tokens=6), ModelConfig(), CPU)
    prompts = [[1, 4093, 198], [1, 520, 9531, 198, 33]]
    g1 = eng.generate(prompts, n=2, greedy=True, desc=False)
    g2 = eng.generate(prompts, n=2, greedy=True, desc=False)
    assert torch.equal(g1.response_ids, g2.response_ids)
    assert g1.response_list(0) == g1.response_list(1)  # greedy copies of one prompt agree
    torch.manual_seed(1)
    s = eng.generate(prompts, n=4, temperature=1.0, top_p=1.0, desc=False)
    assert len({tuple(s.response_list(i)) for i in range(4)}) > 1


def test_generation_restores_train_mode(tiny):
    model, tok = tiny
    model.train()
    HFEngine(model, tok, RolloutConfig(max_new_tokens=2), ModelConfig(), CPU).generate([[1, 2, 3]], desc=False)
    assert model.training


def test_bf16_copy_is_synced_after_a_weight_change(tiny):
    import copy

    model, tok = tiny
    model = copy.deepcopy(model)
    eng = HFEngine(model, tok, RolloutConfig(max_new_tokens=5, hf_dtype="bfloat16"), ModelConfig(), CPU)
    assert eng.model is not model and next(eng.model.parameters()).dtype == torch.bfloat16
    prompts = [[1, 4093, 198], [1, 520, 9531]]
    before = eng.generate(prompts, greedy=True, desc=False)
    with torch.no_grad():  # a large change of the policy: scale the final norm and shift the embeddings
        model.model.norm.weight.mul_(-3.0)
        model.model.embed_tokens.weight.add_(torch.randn_like(model.model.embed_tokens.weight))
    same = eng.generate(prompts, greedy=True, desc=False)
    assert torch.equal(before.response_ids, same.response_ids)  # the copy has not seen the change yet
    eng.sync_weights(model)
    after = eng.generate(prompts, greedy=True, desc=False)
    assert not torch.equal(before.response_ids, after.response_ids)
    for p, q in zip(eng.model.parameters(), model.parameters()):
        torch.testing.assert_close(p.float(), q.detach(), atol=0.05, rtol=0.01)


def test_from_lists_roundtrip():
    rb = RolloutBatch.from_lists([[5, 6], [7]], [[1, 2, 3], [4]], ["a", "b"], [True, False], pad_id=0)
    assert rb.prompt_ids.tolist() == [[5, 6], [0, 7]] and rb.prompt_mask.tolist() == [[1, 1], [0, 1]]
    assert rb.response_ids.tolist() == [[1, 2, 3], [4, 0, 0]]
    assert rb.response_list(1) == [4] and rb.prompt_list(1) == [7] and rb.n_response_tokens == 4
