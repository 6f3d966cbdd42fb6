"""What a Hugging Face model does to lm_head's output, in the kernels' terms (shared by the TRL adapter and the
dph_train loop): head_transform reads it from the config, verify_head checks it on a short forward."""
from __future__ import annotations

import torch


def head_transform(model) -> dict:
    """The softcap / logit_scale keyword arguments of the dph kernels that reproduce what the model's forward does to
    lm_head's output, read from its (text) config: final_logit_softcapping (Gemma 2 / 3: cap * tanh(logits / cap))
    and the first scale field present, in TRL's order: logit_scale (Cohere), output_multiplier, lm_head_multiplier
    (Falcon-H1) multiply the logits; logits_scaling divides them (Granite, MiniCPM3; HyperCLOVA X multiplies).
    verify_head checks the result against the model's own logits."""
    c = model.config
    c = c.get_text_config() if hasattr(c, "get_text_config") else c
    softcap = getattr(c, "final_logit_softcapping", None)
    scale = None
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        if scale is None and getattr(c, name, None) is not None:
            scale = float(getattr(c, name))
    if scale is None and getattr(c, "logits_scaling", None) is not None:
        v = float(c.logits_scaling)
        scale = v if getattr(c, "model_type", "") == "hyperclovax" else 1.0 / v
    return dict(softcap=None if not softcap else float(softcap), logit_scale=1.0 if scale is None else scale)


# The largest gap (nats) verify_head accepts, by the dtype of the model's weights: a bf16 / fp16 forward rounds its
# logits, a head transform left out (a cap, a scale) moves them by far more at the logits a model produces.
VERIFY_ATOL = {torch.float32: 1e-3, torch.float64: 1e-6, torch.bfloat16: 5e-2, torch.float16: 1e-2}


@torch.no_grad()
def verify_head(model, head: dict | None = None, tokens: int = 8, atol: float | None = None) -> float:
    """Checks that dk.linear_logprob(last hidden state, lm_head.weight, **head) gives the log-probs of the model's
    own logits on a few tokens (one short forward); raises NotImplementedError naming the gap otherwise, so a head
    the kernels cannot reproduce never trains on wrong log-probs. atol defaults to VERIFY_ATOL of the weight's
    dtype. Returns the largest difference (nats)."""
    from ..linear_logprob import linear_logprob

    head = head_transform(model) if head is None else head
    was_training = model.training
    model.eval()
    try:
        lm_head = model.get_output_embeddings()
        w = lm_head.weight
        w = w.full_tensor() if hasattr(w, "full_tensor") else w  # an FSDP2 shard: the whole head
        atol = VERIFY_ATOL.get(w.dtype, 1e-3) if atol is None else atol
        ids = (torch.arange(tokens, device=w.device) * 7919 % w.shape[0]).unsqueeze(0)
        targets = ids.roll(-1, 1)
        logits = model(input_ids=ids).logits.float()
        want = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
        h = decoder(input_ids=ids).last_hidden_state
        bias = getattr(lm_head, "bias", None)
        bias = bias.full_tensor() if hasattr(bias, "full_tensor") else bias
        got = linear_logprob(h, w.to(h.dtype), targets, bias=None if bias is None else bias.to(h.dtype),
                             impl="torch", **head)
    finally:
        model.train(was_training)
    gap = float((got - want).abs().max())
    if not gap <= atol:
        raise NotImplementedError(
            f"{type(model).__name__}: log-probs from lm_head.weight with softcap={head['softcap']}, "
            f"logit_scale={head['logit_scale']} differ from the model's own logits by {gap:.3g} nats; its head does "
            "something the dph kernels cannot reproduce (see dph_kernels.integrations.hf_head.head_transform)")
    return gap
