"""Realistic benchmark inputs: how peaked the softmax of a real LM is, and synthetic inputs that match it.

Random weights (benchmarks.ops.make_inputs) give a near-uniform softmax; a real LM is peaked, and that decides how
much CCE-style gradient filtering (skipping softmax tiles whose probabilities are all tiny) can save.

    smollm2_head_inputs     real last hidden states (after the final norm) and lm_head weight of the bundled
                            SmolLM2-135M-Instruct on the project's own docs, targets = the next tokens
    softmax_stats           entropy, max-probability, target log-prob, and the fraction of BLOCK_N x BLOCK_V
                            softmax tiles whose largest probability is below 2^-12 (what filtering could skip)
    synthetic_peaked_inputs Gaussian inputs with a Zipf-like vocabulary bias and a logit scale set by bisection so
                            that the mean entropy matches a target (SmolLM2's), for the large GPU shapes

CLI: python -m benchmarks.inputs [--tokens 2048] [--json out.json]

Measured on 2026-12-07, 2-core CPU (`python -m benchmarks.inputs --tokens 2048`; N=2048, D=576, V=49152;
skippable = fraction of 64x128 tiles whose largest probability is below 2^-12):

    inputs                      H nats  H bits  std   p10   p50   p90   max p  target logp  skippable
    smollm2 (real, docs text)   3.729   5.379   1.87  0.97  3.90  6.20  0.340  -4.31        0.061
    random (ops.make_inputs)    8.809  12.708   0.15  8.62  8.82  8.98  0.015  -12.79       0.000
    synthetic_peaked_inputs     3.754   5.416   2.07  1.08  3.59  6.68  0.344  -3.81        0.0003

So a real LM's softmax is far more peaked than the random inputs, yet at 64x128 tiles only ~6% of the tiles of
SmolLM2 on this text could be skipped; the synthetic inputs match its entropy and max-probability but skip even
less (with the vocabulary bias fully ordered by id, zipf_corr=1, they would skip 74%; zipf_corr=0.75: 19%).
At the gemma2-2b shape (N=256, bf16, no softcap) the synthetic inputs gave 3.76 nats and 24% skippable tiles.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import math
import os
import time

import torch

SMOLLM2_SHAPE = (576, 49152)  # (D, V), as registry.MODELS["smollm2-135m"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE_DIR = os.path.join(REPO, "runs", "cache")  # runs/ is git-ignored
BLOCK_N, BLOCK_V, THRESHOLD = 64, 128, 2.0 ** -12
STATS_BUFFER_BYTES = 64 << 20  # one fp32 [rows, V] chunk; softmax_stats holds about three of them


# ----------------------------------------------------------------------------------------------------------------------
# Real inputs: SmolLM2-135M-Instruct on the project's docs
# ----------------------------------------------------------------------------------------------------------------------

def docs_text() -> str:
    """Fixed English text the project ships: README.md and the docs' markdown files, concatenated."""
    paths = [os.path.join(REPO, "README.md")] + sorted(glob.glob(os.path.join(REPO, "docs", "**", "*.md"),
                                                                 recursive=True))
    return "\n\n".join(open(p, encoding="utf-8").read() for p in paths)


def _load_smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dph_train.models import SMOLLM2_GGUF, smollm2_folder  # also sets HF_HUB_OFFLINE=1

    folder = smollm2_folder()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    return model.eval(), tok


@torch.no_grad()
def _compute_smollm2_head(n_tokens: int, seq_len: int, text: str) -> dict:
    model, tok = _load_smollm2()
    ids = torch.tensor(tok(text, add_special_tokens=False).input_ids)
    n_seq = math.ceil(n_tokens / seq_len)
    if n_seq * seq_len + 1 > ids.numel():
        raise ValueError(f"the docs give {ids.numel() - 1} tokens with a next token; asked for {n_tokens}")
    # Sequence i reads tokens [i*T, (i+1)*T) and predicts [i*T+1, (i+1)*T+1): no token is its own target.
    inputs = ids[:n_seq * seq_len].view(n_seq, seq_len)
    targets = ids[1:n_seq * seq_len + 1].view(n_seq, seq_len)
    weight = model.get_output_embeddings().weight.float()
    hidden = []
    for i in range(n_seq):
        out = model(input_ids=inputs[i:i + 1], output_hidden_states=True)
        h = out.hidden_states[-1][0].float()
        if i == 0:  # hidden_states[-1] must be what goes into lm_head (Llama: after the final norm)
            gap = float((h @ weight.T - out.logits[0].float()).abs().max())
            if gap > 1e-3:
                raise RuntimeError(f"hidden_states[-1] @ lm_head.weight.T differs from the logits by {gap}")
        hidden.append(h)
    hidden = torch.cat(hidden)[:n_tokens].contiguous()
    return dict(hidden=hidden, targets=targets.reshape(-1)[:n_tokens].clone(), weight=weight.contiguous())


def smollm2_head_inputs(n_tokens: int, dtype=torch.float32, seed: int = 0, seq_len: int = 256):
    """-> (hidden (N, 576), weight (49152, 576), targets (N,)): SmolLM2-135M-Instruct's last hidden states (after
    the final norm, i.e. lm_head's input) on the project's docs (docs_text) cut into sequences of `seq_len` tokens,
    its lm_head weight (dequantized from the Q4_1 GGUF), and the next tokens of the text. Computed once (~1 min on a
    2-core CPU) and cached under runs/cache/; recomputed when the docs change. `seed` only picks the order of the
    sequences (seed 0: the text order), the tokens themselves are fixed by the text."""
    text = docs_text()
    digest = hashlib.sha1(f"{text}|{seq_len}".encode()).hexdigest()[:12]
    os.makedirs(CACHE_DIR, exist_ok=True)
    path = os.path.join(CACHE_DIR, f"smollm2_head_{n_tokens}.pt")
    weight_path = os.path.join(CACHE_DIR, "smollm2_lm_head.pt")
    data = torch.load(path) if os.path.exists(path) else None
    if data is None or data["digest"] != digest or not os.path.exists(weight_path):
        data = _compute_smollm2_head(n_tokens, seq_len, text)
        torch.save(data.pop("weight"), weight_path)
        data["digest"] = digest
        torch.save(data, path)
    hidden, targets = data["hidden"], data["targets"]
    weight = torch.load(weight_path)
    if seed:
        order = torch.randperm(math.ceil(n_tokens / seq_len), generator=torch.Generator().manual_seed(seed))
        rows = (order[:, None] * seq_len + torch.arange(seq_len)).reshape(-1)
        rows = rows[rows < n_tokens]
        hidden, targets = hidden[rows], targets[rows]
    return hidden.to(dtype), weight.to(dtype), targets


# ----------------------------------------------------------------------------------------------------------------------
# How peaked is the softmax
# ----------------------------------------------------------------------------------------------------------------------

def _rows_per_chunk(V: int, multiple: int) -> int:
    rows = max(1, STATS_BUFFER_BYTES // (4 * V))
    return max(multiple, rows // multiple * multiple)


def _softcapped(z, softcap):
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def _logits(h, weight_fp32, softcap):
    return _softcapped(h.float() @ weight_fp32.T, softcap)


@torch.no_grad()
def softmax_stats(hidden, weight, targets=None, block_n: int = BLOCK_N, block_v: int = BLOCK_V,
                  threshold: float = THRESHOLD, softcap: float | None = None) -> dict:
    """Statistics of softmax(hidden @ weight.T) (optionally softcapped), in fp32, a chunk of rows at a time.

    skippable_tile_fraction: the fraction of block_n x block_v tiles (consecutive rows x consecutive vocabulary
    columns, partial tiles at the ends included) whose largest probability is below `threshold`: the most that
    CCE-style gradient filtering at that threshold could skip."""
    N, V = hidden.shape[0], weight.shape[0]
    n_vblocks = math.ceil(V / block_v)
    entropy, max_prob, target_logp, row_tile_max = [], [], [], []
    step = _rows_per_chunk(V, block_n)
    weight = weight.float()  # once, not per chunk (a bf16 weight of 256000 x 2304 is 2.4 GB in fp32)
    for i in range(0, N, step):
        logp = torch.log_softmax(_logits(hidden[i:i + step], weight, softcap), dim=-1)
        p = logp.exp()
        entropy.append(-(p * logp).sum(-1))
        max_prob.append(p.amax(-1))
        if targets is not None:
            target_logp.append(logp.gather(-1, targets[i:i + step, None].long()).squeeze(-1))
        # Largest probability of each row within each vocabulary block (the last block padded with zeros).
        p = torch.nn.functional.pad(p, (0, n_vblocks * block_v - V))
        row_tile_max.append(p.view(p.shape[0], n_vblocks, block_v).amax(-1))
    row_tile_max = torch.cat(row_tile_max)
    row_tile_max = torch.nn.functional.pad(row_tile_max, (0, 0, 0, math.ceil(N / block_n) * block_n - N))
    tile_max = row_tile_max.view(-1, block_n, n_vblocks).amax(1)
    entropy = torch.cat(entropy).cpu()
    q10, q50, q90 = torch.quantile(entropy, torch.tensor([0.1, 0.5, 0.9])).tolist()
    stats = dict(
        n_tokens=N, vocab=V,
        entropy_nats_mean=float(entropy.mean()), entropy_bits_mean=float(entropy.mean()) / math.log(2),
        entropy_nats_std=float(entropy.std()) if N > 1 else 0.0,
        entropy_nats_p10=q10, entropy_nats_p50=q50, entropy_nats_p90=q90,
        max_prob_mean=float(torch.cat(max_prob).mean()),
        skippable_tile_fraction=float((tile_max < threshold).float().mean()),
        tiles=tile_max.numel(), block_n=block_n, block_v=block_v, threshold=threshold,
    )
    if targets is not None:
        stats["target_logprob_mean"] = float(torch.cat(target_logp).mean())
    return stats


# ----------------------------------------------------------------------------------------------------------------------
# Synthetic inputs with a given mean entropy
# ----------------------------------------------------------------------------------------------------------------------

SMOLLM2_ENTROPY_NATS = 3.73  # SmolLM2's mean per-token entropy on the docs text (3.729 nats = 5.38 bits, measured)
ZIPF_RATIO = 0.83  # std of the per-token bias / std of the contextual logits, measured on SmolLM2 (docs text)
ZIPF_CORR = 0.47  # correlation of SmolLM2's per-token bias with -log(1 + vocab id)
ROW_SCALE_SIGMA = 0.3  # log-normal spread of the per-row logit scale; gives SmolLM2's entropy spread (std ~2 nats)
CALIBRATION_ROWS = 512  # their fp32 logits are kept: 512 MiB at V = 256000
BUFFER_BYTES = 256 << 20  # one fp32 [rows, V] chunk while calibrating and sampling


def _row_chunks(n_rows: int, V: int):
    step = max(1, BUFFER_BYTES // (4 * V))
    return [slice(i, i + step) for i in range(0, n_rows, step)]


def _mean_entropy(logit_chunks, scale: float) -> float:
    total, rows = 0.0, 0
    for logits in logit_chunks:
        logp = torch.log_softmax(logits * scale, dim=-1)
        total -= float((logp.exp() * logp).sum())
        rows += logits.shape[0]
    return total / rows


def _logit_scale_for(hidden, weight, target_entropy: float, iters: int = 16) -> float:
    """s with mean entropy of softmax(s * hidden @ weight.T) == target, by bisection on log s in [-6, 6] (the
    entropy of a softmax falls monotonically as its logits are scaled up)."""
    V = weight.shape[0]
    if not 0.0 < target_entropy < math.log(V):
        raise ValueError(f"target entropy {target_entropy} is outside (0, log V = {math.log(V):.3f})")
    logit_chunks = [hidden[rows] @ weight.T for rows in _row_chunks(hidden.shape[0], V)]
    lo, hi = -6.0, 6.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        if _mean_entropy(logit_chunks, math.exp(mid)) > target_entropy:
            lo = mid
        else:
            hi = mid
    return math.exp((lo + hi) / 2)


def _normal_quantiles(n: int, device) -> torch.Tensor:
    """n evenly spaced quantiles of N(0, 1): a stratified sample, so a few rows already have the right mean."""
    p = (torch.arange(n, device=device, dtype=torch.float64) + 0.5) / n
    return (math.sqrt(2) * torch.erfinv(2 * p - 1)).float()


def _peaked_hidden(n: int, D: int, gen, device, row_scale_sigma: float) -> torch.Tensor:
    hidden = torch.randn(n, D, generator=gen, device=device)
    hidden[:, -1] = 1.0  # the bias feature
    order = torch.randperm(n, generator=gen, device=device)
    return hidden * torch.exp(row_scale_sigma * _normal_quantiles(n, device)[order, None])


@torch.no_grad()
def synthetic_peaked_inputs(N: int, D: int, V: int, dtype=torch.float32, device="cpu",
                            target_entropy_nats=SMOLLM2_ENTROPY_NATS,
                            seed: int = 0, zipf_ratio: float = ZIPF_RATIO, zipf_corr: float = ZIPF_CORR,
                            row_scale_sigma: float = ROW_SCALE_SIGMA):
    """-> (hidden (N, D), weight (V, D), targets (N,)) whose softmax has mean per-token entropy
    `target_entropy_nats` (within ~2%: calibrated on CALIBRATION_ROWS extra rows of the same distribution).

    Construction, in the plain linear form the kernels take (logits = hidden @ weight.T, no bias):
      * contextual part: Gaussian hidden[:, :D-1] and weight[:, :D-1] (logits ~ N(0, 1) per row);
      * a per-token unigram bias: a "bias feature" hidden[:, D-1] = 1 times weight[:, D-1] = zipf_ratio * b,
        b standardised, with correlation zipf_corr to -log(1 + vocab id) (BPE gives frequent tokens low ids) and
        Gaussian otherwise; both numbers measured on SmolLM2 (bias std / contextual std, and that correlation);
      * each row scaled by exp(row_scale_sigma * eps), eps a shuffled stratified N(0, 1) sample, so that some
        positions are peaked and some flat instead of all having the same entropy;
      * one logit scale s, found by bisection, folded into the weight;
      * targets sampled from the resulting softmax (like a model's own samples in RL), a chunk of rows at a time.
    No softcap: calibrated without one. Under Gemma 2's cap of 30 these logits saturate and the softmax flattens
    (measured at the gemma2-2b shape, N=256, target 3.73: 6.12 nats with the cap, 3.76 without), and with the cap
    no scale reaches 3.73 nats (the lowest is ~5.5 at N=128), so softcapped cases need another construction.
    Deterministic for a given (seed, device); generated on `device` (fast on CUDA for V = 256000)."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = _peaked_hidden(N, D, gen, device, row_scale_sigma)
    weight = torch.randn(V, D, generator=gen, device=device) / math.sqrt(max(D - 1, 1))
    zipf = -torch.log1p(torch.arange(V, device=device, dtype=torch.float32))
    zipf = (zipf - zipf.mean()) / zipf.std()
    bias = zipf_corr * zipf + math.sqrt(1 - zipf_corr ** 2) * torch.randn(V, generator=gen, device=device)
    weight[:, -1] = zipf_ratio * (bias - bias.mean()) / bias.std()
    calibration = _peaked_hidden(min(N, CALIBRATION_ROWS), D, gen, device, row_scale_sigma)
    weight *= _logit_scale_for(calibration, weight, target_entropy_nats)
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    targets = torch.empty(N, dtype=torch.long, device=device)
    weight_fp32 = weight.float()  # the softmax of the inputs as returned (after rounding to dtype)
    for rows in _row_chunks(N, V):
        probs = torch.softmax(hidden[rows].float() @ weight_fp32.T, dim=-1)
        targets[rows] = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
    return hidden, weight, targets


# ----------------------------------------------------------------------------------------------------------------------
# CLI: the three kinds of inputs side by side at the smollm2 shape
# ----------------------------------------------------------------------------------------------------------------------

def compare_inputs(n_tokens: int = 2048) -> dict:
    """softmax_stats of SmolLM2's real inputs, of ops.make_inputs' random ones and of synthetic_peaked_inputs with
    SmolLM2's mean entropy, all at the smollm2 shape (n_tokens, 576, 49152)."""
    from benchmarks.ops import make_inputs

    D, V = SMOLLM2_SHAPE
    t0 = time.time()
    real = softmax_stats(*smollm2_head_inputs(n_tokens))
    real["seconds"] = time.time() - t0
    t0 = time.time()
    inp = make_inputs("logprob", n_tokens, D, V, torch.float32, "cpu")
    rand = softmax_stats(inp.hidden.detach(), inp.weight.detach(), inp.targets)
    rand["seconds"] = time.time() - t0
    t0 = time.time()
    synth = softmax_stats(*synthetic_peaked_inputs(n_tokens, D, V, target_entropy_nats=real["entropy_nats_mean"]))
    synth["seconds"] = time.time() - t0
    return {"smollm2": real, "random (ops.make_inputs)": rand, "synthetic_peaked_inputs": synth}


def _print_table(results: dict) -> None:
    cols = [("entropy_nats_mean", "H nats"), ("entropy_bits_mean", "H bits"), ("entropy_nats_std", "std"),
            ("entropy_nats_p10", "p10"), ("entropy_nats_p50", "p50"), ("entropy_nats_p90", "p90"),
            ("max_prob_mean", "max p"), ("target_logprob_mean", "tgt logp"),
            ("skippable_tile_fraction", "skippable"), ("seconds", "s")]
    any_stats = next(iter(results.values()))
    print(f"N={any_stats['n_tokens']} V={any_stats['vocab']}; skippable = fraction of {any_stats['block_n']}x"
          f"{any_stats['block_v']} tiles with max prob < 2^{math.log2(any_stats['threshold']):.0f}")
    print(f"{'inputs':26s}" + "".join(f"{name:>10s}" for _, name in cols))
    for label, stats in results.items():
        print(f"{label:26s}" + "".join(f"{stats.get(key, float('nan')):10.4f}" for key, _ in cols))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.inputs", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--json", help="write the numbers here")
    args = ap.parse_args(argv)
    results = compare_inputs(args.tokens)
    _print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
