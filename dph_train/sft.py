"""Supervised fine-tuning on the styles task: the starting point of `dph-train compare` (a tiny Llama built from a
config, or a pretrained model: SFTConfig.base_model).

The paper's central experiment starts from a model that already answers in several styles. Here a small Llama built
from a config (no download) learns, from the training prompts, to answer with a style drawn uniformly at random and
that style's exact transform. It therefore samples every style about equally — valid for the prompt or not: which
styles are *rewarded* is left for RL to discover. A share of the sequences (SFTConfig.t2_share) are the task's
forgetting probes ("t2-train", half t2a, half t2b, each with its one fixed answer): held-out skills that SFT teaches
and RL never trains, so that what RL makes the model forget can be measured on t2a / t2b. The result is cached as a
plain HF folder (model + tokenizer) and reused when the same settings ask for it again.

With SFTConfig.base_model set (e.g. "smollm2", the bundled SmolLM2-135M-Instruct), the model and its tokenizer are
loaded instead, and only its top `train_layers` decoder layers and the final norm are trained (freeze_below): which
style to write and the letter transforms are output-side behaviour the top of the stack can learn, while the lower
layers and the embeddings hold the pretrained knowledge the keep-rate probes measure. The embeddings are tied to the
lm_head in SmolLM2, so training them would also move every output logit of every other skill: they stay frozen.
Freezing the bottom also makes SFT cheap (no backward below the trained layers). The prompts are encoded exactly as
RL and evaluation encode them (common.encode_prompt: the chat template when task.chat_template), the answer is the
style word, the transform, then the tokenizer's end of sequence (SmolLM2: <|im_end|>, the end of the assistant turn).
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from dataclasses import asdict

import torch

import dph_kernels as dk

from .batching import collate, response_hidden
from .common import encode_prompt
from .config import ModelConfig, SFTConfig
from .models import backbone, output_weight, save_hf_folder

# SFTConfig fields that only a pretrained base model reads: left out of the toy's cache key, so that the toy's cached
# SFT folders written before these fields existed are still reused
PRETRAINED_ONLY = ("base_model", "train_layers", "rehearsal_share")
# Generic prompts (none of the keep-rate probes' kinds: capitals, weekdays, months, opposites, sums) whose answers the
# base model gives greedily before SFT: replayed during SFT (SFTConfig.rehearsal_share). Measured 2026-12-08 without
# it: SmolLM2 SFT'd on the styles task alone answered every one of the 100 probes with a style ("reverse b a a a").
REHEARSAL_FILE = os.path.join(os.path.dirname(__file__), "tasks", "data", "rehearsal_prompts.jsonl")
REHEARSAL_MAX_NEW = 32


def build_model(tok, sc: SFTConfig, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tok), hidden_size=sc.hidden_size, intermediate_size=sc.intermediate_size,
                         num_hidden_layers=sc.layers, num_attention_heads=sc.heads, num_key_value_heads=sc.heads,
                         max_position_embeddings=64, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def freeze_below(model, train_layers: int) -> list:
    """Freeze everything but the top `train_layers` decoder layers and the final norm (embeddings and the tied
    lm_head stay frozen); returns the names of the trained parameters."""
    layers = backbone(model).layers
    if not 1 <= train_layers <= len(layers):
        raise ValueError(f"compare.sft.train_layers: expected 1..{len(layers)} (the model's layers), "
                         f"got {train_layers}")
    model.requires_grad_(False)
    for layer in layers[len(layers) - train_layers:]:
        layer.requires_grad_(True)
    backbone(model).norm.requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def rehearsal_pairs(model, tok, enc) -> list:
    """The base model's own greedy answers (up to its end of sequence, at most REHEARSAL_MAX_NEW tokens; unfinished
    ones are dropped) to the generic rehearsal prompts: [(prompt ids, answer ids + eos)]."""
    with open(REHEARSAL_FILE) as f:
        prompts = [enc(json.loads(line)["prompt"]) for line in f if line.strip()]
    width = max(len(p) for p in prompts)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])  # left padding: answers start together
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=REHEARSAL_MAX_NEW, do_sample=False,
                             pad_token_id=pad, eos_token_id=tok.eos_token_id)[:, width:].tolist()
    pairs = []
    for p, a in zip(prompts, out):
        if tok.eos_token_id in a:
            pairs.append((p, a[:a.index(tok.eos_token_id) + 1]))
    return pairs


def sft_styles(task, folder: str, sc: SFTConfig, seed: int = 0, log=print, task_cfg=None,
               model_cfg: ModelConfig | None = None) -> str:
    """Train (or reuse) the SFT model in `folder`; returns the folder. Each sequence is, with probability
    sc.t2_share, a t2-train probe with its fixed answer (held-out skills SFT teaches and RL never trains: they measure
    forgetting), otherwise a training prompt answered in a uniformly random style. task_cfg: how prompts are encoded
    (common.encode_prompt; None: the plain prompt); model_cfg: the model section a pretrained base_model is loaded
    with (its name replaced by sc.base_model)."""
    from .tasks.styles import build_tokenizer

    marker = os.path.join(folder, "sft.json")
    key = {k: v for k, v in asdict(sc).items() if sc.base_model is not None or k not in PRETRAINED_ONLY}
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f).get("config") == dict(key, seed=seed):
                log(f"[sft] reusing {folder}")
                return folder
    t0 = time.time()
    if sc.base_model is None:
        tok = build_tokenizer()
        model = build_model(tok, sc, seed)
    else:
        from .models import load_model

        mc = dataclasses.replace(model_cfg or ModelConfig(), name=sc.base_model, tokenizer=None,
                                 gradient_checkpointing=False)
        model, tok = load_model(mc, "cpu")
        trained = freeze_below(model, sc.train_layers)
        log(f"[sft] {sc.base_model}: training the top {sc.train_layers} decoder layers + final norm "
            f"({sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.1f}M of "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params; {trained[0]} .. {trained[-1]})")

    def enc(prompt):
        return encode_prompt(tok, prompt, task_cfg) if task_cfg is not None else tok(prompt)["input_ids"]

    styles = task.STYLES
    examples = task.examples("train")
    prompts = [enc(ex.prompt) for ex in examples]
    answers = {s: [tok(f"{s} {ex.answer[s]}", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                   for ex in examples] for s in styles}
    # the probes of each kind with their one answer ("swap ..." / "rot ...")
    t2 = {}
    for ex in task.examples("t2-train"):
        word = ex.meta["valid"][0]
        t2.setdefault(ex.meta["category"], []).append(
            (enc(ex.prompt), tok(f"{word} {ex.answer[word]}", add_special_tokens=False)["input_ids"]
             + [tok.eos_token_id]))
    t2_kinds = sorted(t2)
    rehearsal = []
    if sc.base_model is not None and sc.rehearsal_share > 0:
        model.eval()
        rehearsal = rehearsal_pairs(model, tok, enc)
        log(f"[sft] rehearsal: the base model's own greedy answers to {len(rehearsal)} generic prompts (finished "
            f"within {REHEARSAL_MAX_NEW} tokens), replayed in {sc.rehearsal_share:.0%} of the sequences")
    if sc.t2_share > 0 and not t2_kinds:
        raise ValueError("compare.sft.t2_share > 0 but the task has no t2-train probes (task.kwargs n_t2_train=0?)")
    rng = random.Random(f"sft:{seed}")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=sc.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / sc.steps))
    model.train()
    for step in range(sc.steps):
        seqs = []
        for _ in range(sc.batch_size):
            if rehearsal and rng.random() < sc.rehearsal_share:  # no draw without rehearsal: the toy's stream stays
                seqs.append(rng.choice(rehearsal))
            elif sc.t2_share > 0 and rng.random() < sc.t2_share:
                seqs.append(rng.choice(t2[rng.choice(t2_kinds)]))
            else:
                i = rng.randrange(len(examples))
                seqs.append((prompts[i], answers[rng.choice(styles)][i]))
        b = collate([p for p, _ in seqs], [r for _, r in seqs], tok.pad_token_id)
        logp = dk.linear_logprob(response_hidden(model, b), output_weight(model), b.targets)
        loss = -(logp * b.response_mask).sum() / b.response_mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % (100 if sc.base_model is None else 10) == 0 or step == 0:  # a real model's step is slow
            log(f"[sft] step {step + 1}/{sc.steps} loss {loss.item():.4f}")
    model.requires_grad_(True)  # the saved model is an ordinary one: RL trains every parameter
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    save_hf_folder(model, tok, folder)
    with open(marker, "w") as f:
        json.dump(dict(config=dict(key, seed=seed), seconds=round(time.time() - t0, 1), final_loss=loss.item()), f)
    log(f"[sft] done in {time.time() - t0:.1f}s, final loss {loss.item():.4f} -> {folder}")
    return folder
