"""Sequences, padding, and per-token log-probs of responses from the backbone's hidden states.

Layout of a padded batch (the same one `generate` uses): the prompt is left-padded to P columns and the response is
right-padded to R columns, so every response starts at column P. The hidden state at column t predicts token t+1, so
the response's R tokens are predicted by hidden[:, P-1 : P-1+R] — only those R rows ever reach the fused kernel,
and no [tokens x vocab] logits are built.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

import dph_kernels as dk

from .models import autocast, backbone, head_transform, output_weight

IGNORE = -100


@dataclass
class Seq:
    """One training sequence: a prompt and one response, routed to D_exp (advantage) or D_pef (stored ref log-probs)."""
    prompt_ids: list
    response_ids: list
    advantage: float = 0.0
    is_pef: bool = False
    ref_logp: list | None = None  # stored log pi_ref per response token (D_pef)
    old_logp: list | None = None  # log pi_old per response token (filled by the trainer)
    online_ref_logp: list | None = None  # log pi_ref from a live reference model (rkl)
    meta: dict = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return len(self.response_ids)


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, P+R)
    attention_mask: torch.Tensor  # (B, P+R)
    position_ids: torch.Tensor  # (B, P+R)
    targets: torch.Tensor  # (B, R) response tokens, IGNORE on padding
    response_mask: torch.Tensor  # (B, R) bool
    prompt_len: int  # P

    def to(self, device):
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.position_ids.to(device),
                     self.targets.to(device), self.response_mask.to(device), self.prompt_len)


def collate(prompts: list, responses: list, pad_id: int) -> Batch:
    B = len(prompts)
    P = max(len(p) for p in prompts)
    R = max(1, max(len(r) for r in responses))
    input_ids = torch.full((B, P + R), pad_id, dtype=torch.long)
    attn = torch.zeros((B, P + R), dtype=torch.long)
    targets = torch.full((B, R), IGNORE, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        if len(p) == 0:
            raise ValueError("empty prompt: the first response token needs a hidden state to be predicted from")
        input_ids[i, P - len(p):P] = torch.as_tensor(p, dtype=torch.long)
        attn[i, P - len(p):P] = 1
        if len(r):
            input_ids[i, P:P + len(r)] = torch.as_tensor(r, dtype=torch.long)
            attn[i, P:P + len(r)] = 1
            targets[i, :len(r)] = torch.as_tensor(r, dtype=torch.long)
    position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
    return Batch(input_ids, attn, position_ids, targets, targets != IGNORE, P)


def pad_float(rows: list, R: int, value: float = 0.0) -> torch.Tensor:
    out = torch.full((len(rows), R), value, dtype=torch.float32)
    for i, r in enumerate(rows):
        if r is not None and len(r):
            out[i, :len(r)] = torch.as_tensor(r, dtype=torch.float32)
    return out


def response_hidden(model, batch: Batch) -> torch.Tensor:
    """(B, R, D) last hidden states (after the final norm) at the positions that predict the response tokens."""
    out = backbone(model)(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                          position_ids=batch.position_ids, use_cache=False)
    P, R = batch.prompt_len, batch.targets.shape[1]
    return out.last_hidden_state[:, P - 1:P - 1 + R]


def head_weight_like(model, hidden: torch.Tensor) -> torch.Tensor:
    w = output_weight(model)
    return w if w.dtype == hidden.dtype else w.to(hidden.dtype)  # bf16 autocast: the kernel wants one dtype


def response_logprobs(model, batch: Batch, model_cfg, *, temperature: float = 1.0, return_entropy: bool = False,
                      impl: str = "auto"):
    """log pi(response token) (B, R) fp32 via dk.linear_logprob (0 on padding); with entropy if asked."""
    device = batch.input_ids.device
    with autocast(model_cfg, device):
        h = response_hidden(model, batch)
    return dk.linear_logprob(h, head_weight_like(model, h), batch.targets, temperature=temperature,
                             ignore_index=IGNORE, return_entropy=return_entropy, impl=impl, **head_transform(model))


@torch.no_grad()
def score_sequences(model, prompts: list, responses: list, pad_id: int, model_cfg, device, *, batch_size: int = 16,
                    temperature: float = 1.0, return_entropy: bool = False, impl: str = "auto"):
    """Per-sequence lists of response-token log-probs (and entropies), in input order, no grad, no logits."""
    was_training = model.training
    model.eval()
    logps, ents = [], []
    try:
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i]))
        res_l, res_e = {}, {}
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            b = collate([prompts[i] for i in idx], [responses[i] for i in idx], pad_id).to(device)
            out = response_logprobs(model, b, model_cfg, temperature=temperature, return_entropy=return_entropy,
                                    impl=impl)
            lp, en = (out if return_entropy else (out, None))
            for j, i in enumerate(idx):
                n = len(responses[i])
                res_l[i] = lp[j, :n].float().cpu().tolist()
                if return_entropy:
                    res_e[i] = en[j, :n].float().cpu().tolist()
        logps = [res_l[i] for i in range(len(prompts))]
        ents = [res_e[i] for i in range(len(prompts))] if return_entropy else None
    finally:
        model.train(was_training)
    return (logps, ents) if return_entropy else logps
