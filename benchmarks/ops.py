"""The benchmarked operations: their inputs, the eager PyTorch math (the "torch eager" baseline, also the float64
reference for the error column), and what gets differentiated.

Operations
    logprob       per-token log pi(y) from hidden states and the lm_head weight            out: (N,)
    logprob-ent   the same plus the entropy of each position's distribution               out: (N,), (N,)
    grpo          the fused DPH loss, GRPO preset (all rows exploration)                   out: scalar
    dph-js        the fused DPH loss, DPH-JS preset (a quarter of the rows near-perfect)   out: scalar
    fdiv-fkl      exact forward KL over the vocabulary between two linear heads           out: (N,)
    fdiv-js       exact Jensen-Shannon divergence between two linear heads                out: (N,)

Per-token outputs are differentiated with a fixed random, non-uniform upstream gradient (one weight per token),
scalars with 1. Gradients are taken with respect to the policy's hidden states and lm_head weight.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

OPS = ["logprob", "logprob-ent", "grpo", "dph-js", "fdiv-fkl", "fdiv-js"]
FAMILY = {
    "logprob": "logprob",
    "logprob-ent": "logprob",
    "grpo": "fused",
    "dph-js": "fused",
    "fdiv-fkl": "fdiv",
    "fdiv-js": "fdiv",
}
PRESET = {"grpo": "grpo", "dph-js": "dph-js"}
FDIV_KIND = {"fdiv-fkl": "fkl", "fdiv-js": "js"}
MODES = ["fwd", "bwd", "fwd+bwd"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# Hyper-parameters of the two presets, from docs/method.md. Used by the eager baseline and the float64 reference
# when dph_kernels' own preset does not expose its configuration (see providers.preset_config).
DEFAULT_PRESETS = {
    "grpo": dict(divergence=None, eta=0.0, alpha=0.5, clip_low=0.2, clip_high=0.2, dual_clip=None,
                 loss_agg="token-mean", temperature=1.0),
    "dph-js": dict(divergence="js", eta=0.2, alpha=0.5, clip_low=0.2, clip_high=0.28, dual_clip=3.0,
                   loss_agg="token-mean", temperature=1.0),
}


def seq_len_for(N: int, seq_len: int) -> tuple[int, int]:
    """(B, T) with B*T == N: sequences of `seq_len` tokens when N allows it, else one sequence."""
    if N >= seq_len and N % seq_len == 0:
        return N // seq_len, seq_len
    return 1, N


@dataclass
class Inputs:
    """Everything one call needs. `hidden` / `weight` are leaves that require grad; the rest is data."""

    op: str
    hidden: torch.Tensor  # (N, D) or (B, T, D) for the fused loss
    weight: torch.Tensor  # (V, D)
    targets: torch.Tensor  # (N,) or (B, T)
    g: torch.Tensor | None = None  # upstream gradient for a per-token output
    g2: torch.Tensor | None = None  # ... for the entropy
    extra: dict = field(default_factory=dict)
    softcap: float | None = None  # the model's final-logit softcap (registry.SOFTCAP), applied by every provider

    @property
    def params(self):
        return [self.hidden, self.weight]

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def nbytes(self) -> int:
        ts = [self.hidden, self.weight, self.targets, self.g, self.g2, *self.extra.values()]
        return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))


INPUT_KINDS = ("random", "peaked", "smollm2")


def make_inputs(op: str, N: int, D: int, V: int, dtype, device, *, seq_len: int = 1024, seed: int = 0,
                softcap: float | None = None, inputs: str = "random") -> Inputs:
    """Deterministic inputs for one case; old/ref log-probs of the fused loss are the true log-probs plus a little
    noise so that clipping and the divergence are exercised. `inputs` picks the head (benchmarks/inputs.py):
    "random": Gaussian, logits of std ~2 (a near-uniform softmax, ~8.8 nats at the smollm2 shape);
    "peaked": synthetic_peaked_inputs, mean entropy matched to SmolLM2's on text (SMOLLM2_ENTROPY_NATS), targets
    sampled from the softmax; "smollm2": the real hidden states and lm_head of the bundled SmolLM2 on text (its
    shape only, D=576 V=49152)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(device=device, dtype=dtype)

    if inputs == "random":
        hidden = randn(N, D)
        weight = randn(V, D, std=2.0 / math.sqrt(D))
        targets = torch.randint(0, V, (N,), generator=gen).to(device)
    else:
        hidden, weight, targets = realistic_head(inputs, N, D, V, dtype, device, seed)
    fam = FAMILY[op]
    inp = Inputs(op, hidden, weight, targets, softcap=softcap)
    if fam == "logprob":
        inp.g = (torch.rand(N, generator=gen) * 2 - 0.5).to(device)
        if op == "logprob-ent":
            inp.g2 = (torch.rand(N, generator=gen) - 0.5).to(device)
    elif fam == "fdiv":
        inp.extra["ref_hidden"] = (hidden.float() + randn(N, D, std=0.3).float()).to(dtype)
        inp.extra["ref_weight"] = (weight.float() + randn(V, D, std=0.5 / math.sqrt(D)).float()).to(dtype)
        inp.g = (torch.rand(N, generator=gen) * 2 - 0.5).to(device)
    else:  # fused loss
        B, T = seq_len_for(N, seq_len)
        inp.hidden = hidden.view(B, T, D)
        inp.targets = targets.view(B, T)
        lengths = torch.randint(max(1, (3 * T) // 4), T + 1, (B,), generator=gen)
        mask = (torch.arange(T)[None, :] < lengths[:, None]).to(torch.float32)
        is_pef = torch.zeros(B, dtype=torch.bool)
        if PRESET[op] != "grpo":
            is_pef[1::4] = True  # rows 1, 5, ...: a quarter near-perfect, and a 2-row slice holds both kinds
        with torch.no_grad():
            true_logp = chunked_logprob(hidden, weight, targets, softcap=softcap).view(B, T).cpu()
        old = (true_logp + torch.randn(B, T, generator=gen) * 0.05).clamp(max=0.0)  # log-probs: <= 0
        ref = (true_logp + torch.randn(B, T, generator=gen) * 0.3).clamp(max=0.0)
        adv = torch.randn(B, generator=gen)
        adv[is_pef] = 0.0
        inp.extra.update(loss_mask=mask.to(device), is_pef=is_pef.to(device), advantages=adv.to(device),
                         old_logp=old.to(device), ref_logp=ref.to(device))
    inp.hidden.requires_grad_(True)
    inp.weight.requires_grad_(True)
    return inp


def realistic_head(kind, N, D, V, dtype, device, seed):
    from . import inputs as real
    if kind == "peaked":
        return real.synthetic_peaked_inputs(N, D, V, dtype, device, real.SMOLLM2_ENTROPY_NATS, seed)
    if kind == "smollm2":
        if (D, V) != real.SMOLLM2_SHAPE:
            raise ValueError(f"inputs='smollm2' has D, V = {real.SMOLLM2_SHAPE}, not {D}, {V}")
        hidden, weight, targets = real.smollm2_head_inputs(N, dtype, seed)
        return hidden.to(device), weight.to(device), targets.to(device)
    raise ValueError(f"inputs must be one of {INPUT_KINDS}, got {kind!r}")


def slice_inputs(inp: Inputs, rows: int, dtype=None) -> Inputs:
    """A small slice of the same case (the first `rows` tokens; for the fused loss the first two sequences, cut to
    rows/2 tokens each), optionally cast to another dtype (float64 for the reference). Fresh leaves."""
    def leaf(t):
        t = t.detach().clone()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t.requires_grad_(True)

    if FAMILY[inp.op] == "fused":
        B, T = inp.targets.shape
        b, t = min(B, 2), max(1, min(T, rows // min(B, 2)))
        cut = lambda x: x[:b, :t].contiguous()  # noqa: E731
        extra = {k: (cut(v) if v.dim() == 2 else v[:b].contiguous()) for k, v in inp.extra.items()}
        return Inputs(inp.op, leaf(cut(inp.hidden)), leaf(inp.weight), cut(inp.targets), extra=extra,
                      softcap=inp.softcap)
    n = min(rows, inp.targets.shape[0])
    extra = {}
    for k, v in inp.extra.items():
        v = v[:n] if k == "ref_hidden" else v
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        extra[k] = v.detach().clone()
    return Inputs(inp.op, leaf(inp.hidden[:n]), leaf(inp.weight), inp.targets[:n].clone(),
                  g=None if inp.g is None else inp.g[:n].clone(),
                  g2=None if inp.g2 is None else inp.g2[:n].clone(), extra=extra, softcap=inp.softcap)


# ----------------------------------------------------------------------------------------------------------------------
# Eager math (materializes the logits; log_softmax in fp32, or fp64 when the inputs are fp64)
# ----------------------------------------------------------------------------------------------------------------------

def _cdt(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _head(z, softcap, temperature=1.0):
    from dph_kernels.reference import head_transform
    return head_transform(z, softcap, 1.0, temperature)


def eager_logprob(hidden, weight, targets, with_entropy=False, temperature=1.0, softcap=None):
    z = _head((hidden @ weight.T).to(_cdt(hidden)), softcap, temperature)
    lsm = torch.log_softmax(z, dim=-1)
    logp = lsm.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return logp
    return logp, -(lsm.exp() * lsm).sum(-1)


@torch.no_grad()
def chunked_logprob(hidden, weight, targets, rows=1024, softcap=None):
    """No-grad log-probs without a full [N, V] buffer (used only to make realistic old/ref log-probs)."""
    return torch.cat([eager_logprob(hidden[i:i + rows], weight, targets[i:i + rows], softcap=softcap)
                      for i in range(0, hidden.shape[0], rows)])


def js_generator(log_u):
    """f(u) = 1/2 [u log u - (u+1) log((u+1)/2)], u = exp(log_u), written to stay finite for |log_u| <= 50."""
    u = torch.exp(log_u)
    # (u+1) log((u+1)/2) = (u+1) (softplus(log_u) - log 2)
    return 0.5 * (u * log_u - (u + 1) * (torch.nn.functional.softplus(log_u) - math.log(2.0)))


def fkl_generator(log_u):
    return torch.expm1(log_u) - log_u


GENERATORS = {"js": js_generator, "fkl": fkl_generator}


def aggregate(values, mask, mode):
    """verl's loss_agg_mode over the tokens where `mask` (B, T) is set; an empty mask gives 0. Branch-free, so that
    torch.compile traces it as one graph."""
    values = torch.where(mask > 0, values, torch.zeros_like(values))
    tokens = mask.sum()
    if mode == "token-mean":
        return values.sum() / tokens.clamp_min(1)
    n_rows = (mask.sum(-1) > 0).sum().clamp_min(1)
    per_row_sum = values.sum(-1)
    if mode == "seq-mean-token-mean":
        return (per_row_sum / mask.sum(-1).clamp_min(1)).sum() / n_rows
    if mode == "seq-mean-token-sum":
        return per_row_sum.sum() / n_rows
    if mode == "seq-mean-token-sum-norm":
        return per_row_sum.sum() / (n_rows * mask.shape[-1])
    raise ValueError(f"unknown loss_agg {mode!r}")


def dph_loss_from_logp(logp, targets, loss_mask, is_pef, advantages, old_logp, ref_logp, cfg):
    """The hybrid loss on per-token log-probs (B, T): PPO-clip on exploration rows + eta * mean f(u) on near-perfect
    rows, each aggregated over its own rows (docs/method.md)."""
    mask = loss_mask.to(logp.dtype)
    exp_mask = mask * (~is_pef).to(logp.dtype)[:, None]
    pef_mask = mask * is_pef.to(logp.dtype)[:, None]
    adv = advantages.to(logp.dtype)
    adv = adv[:, None] if adv.dim() == 1 else adv
    ratio = torch.exp(logp - old_logp.to(logp.dtype))
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - cfg["clip_low"], 1 + cfg["clip_high"]))
    if cfg.get("dual_clip"):
        pg = torch.where(adv < 0, torch.minimum(pg, -cfg["dual_clip"] * adv), pg)
    loss = aggregate(pg, exp_mask, cfg["loss_agg"])
    if cfg.get("divergence"):
        g = GENERATORS[cfg["divergence"]](logp - ref_logp.to(logp.dtype))
        loss = loss + cfg["eta"] * aggregate(g, pef_mask, cfg["loss_agg"])
    return loss


def eager_fused_loss(inp: Inputs, cfg):
    B, T, D = inp.hidden.shape
    logp = eager_logprob(inp.hidden.reshape(B * T, D), inp.weight, inp.targets.reshape(-1),
                         temperature=cfg.get("temperature", 1.0), softcap=inp.softcap).view(B, T)
    e = inp.extra
    return dph_loss_from_logp(logp, inp.targets, e["loss_mask"], e["is_pef"], e["advantages"], e["old_logp"],
                              e["ref_logp"], cfg)


def eager_fdiv(hidden, weight, ref_hidden, ref_weight, kind, softcap=None):
    """Exact per-position D_f(pi_theta || pi_ref) = sum_v pi_ref f(pi_theta / pi_ref) (both heads capped alike)."""
    lp = torch.log_softmax(_head((hidden @ weight.T).to(_cdt(hidden)), softcap), dim=-1)
    with torch.no_grad():
        lq = torch.log_softmax(_head((ref_hidden @ ref_weight.T).to(_cdt(hidden)), softcap), dim=-1)
    if kind == "fkl":  # sum_v q (u - 1 - log u) = KL(pi_ref || pi_theta)
        return (lq.exp() * (lq - lp)).sum(-1)
    if kind == "js":
        lm = torch.logaddexp(lp, lq) - math.log(2.0)
        return 0.5 * ((lp.exp() * (lp - lm)).sum(-1) + (lq.exp() * (lq - lm)).sum(-1))
    raise ValueError(f"unknown divergence kind {kind!r}")


def eager_forward(op: str, inp: Inputs, cfg=None):
    """The eager baseline / reference for any op. Returns the canonical output (tensor, tuple, or scalar)."""
    fam = FAMILY[op]
    if fam == "logprob":
        return eager_logprob(inp.hidden, inp.weight, inp.targets, with_entropy=(op == "logprob-ent"),
                             softcap=inp.softcap)
    if fam == "fdiv":
        return eager_fdiv(inp.hidden, inp.weight, inp.extra["ref_hidden"], inp.extra["ref_weight"], FDIV_KIND[op],
                          inp.softcap)
    return eager_fused_loss(inp, cfg or DEFAULT_PRESETS[PRESET[op]])


def upstream(inp: Inputs, out):
    """(outputs, grad_outputs) for torch.autograd.backward, given a provider's canonical output."""
    if isinstance(out, tuple):
        return list(out), [inp.g, inp.g2]
    if out.dim() == 0:
        return [out], [None]
    return [out], [inp.g]
