"""Supervised fine-tuning of a tiny Llama on the styles task: the starting point of `dph-train compare`.

The paper's central experiment starts from a model that already answers in several styles. Here a small Llama built
from a config (no download) learns, from the training prompts, to answer with a style drawn uniformly at random and
that style's exact transform. It therefore samples every style about equally — valid for the prompt or not: which
styles are *rewarded* is left for RL to discover. A share of the sequences (SFTConfig.t2_share) are the task's
forgetting probes ("t2-train", half t2a, half t2b, each with its one fixed answer): held-out skills that SFT teaches
and RL never trains, so that what RL makes the model forget can be measured on t2a / t2b. The result is cached as a
plain HF folder (model + tokenizer) and reused when the same settings ask for it again.
"""
from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict

import torch

import dph_kernels as dk

from .batching import collate, response_hidden
from .config import SFTConfig
from .models import output_weight, save_hf_folder


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


def sft_styles(task, folder: str, sc: SFTConfig, seed: int = 0, log=print) -> str:
    """Train (or reuse) the SFT model in `folder`; returns the folder. Each sequence is, with probability
    sc.t2_share, a t2-train probe with its fixed answer (held-out skills SFT teaches and RL never trains: they measure
    forgetting), otherwise a training prompt answered in a uniformly random style."""
    from .tasks.styles import STYLES, build_tokenizer

    marker = os.path.join(folder, "sft.json")
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f).get("config") == dict(asdict(sc), seed=seed):
                log(f"[sft] reusing {folder}")
                return folder
    t0 = time.time()
    tok = build_tokenizer()
    model = build_model(tok, sc, seed)
    examples = task.examples("train")
    prompts = [tok(ex.prompt)["input_ids"] for ex in examples]
    answers = {s: [tok(f"{s} {ex.answer[s]}", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                   for ex in examples] for s in STYLES}
    # the probes of each kind with their one answer ("swap ..." / "rot ...")
    t2 = {}
    for ex in task.examples("t2-train"):
        word = ex.meta["valid"][0]
        t2.setdefault(ex.meta["category"], []).append(
            (tok(ex.prompt)["input_ids"], tok(f"{word} {ex.answer[word]}", add_special_tokens=False)["input_ids"]
             + [tok.eos_token_id]))
    t2_kinds = sorted(t2)
    if sc.t2_share > 0 and not t2_kinds:
        raise ValueError("compare.sft.t2_share > 0 but the task has no t2-train probes (task.kwargs n_t2_train=0?)")
    rng = random.Random(f"sft:{seed}")
    opt = torch.optim.AdamW(model.parameters(), lr=sc.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / sc.steps))
    model.train()
    for step in range(sc.steps):
        seqs = []
        for _ in range(sc.batch_size):
            if sc.t2_share > 0 and rng.random() < sc.t2_share:
                seqs.append(rng.choice(t2[rng.choice(t2_kinds)]))
            else:
                i = rng.randrange(len(examples))
                seqs.append((prompts[i], answers[rng.choice(STYLES)][i]))
        b = collate([p for p, _ in seqs], [r for _, r in seqs], tok.pad_token_id)
        logp = dk.linear_logprob(response_hidden(model, b), output_weight(model), b.targets)
        loss = -(logp * b.response_mask).sum() / b.response_mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0 or step == 0:
            log(f"[sft] step {step + 1}/{sc.steps} loss {loss.item():.4f}")
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    save_hf_folder(model, tok, folder)
    with open(marker, "w") as f:
        json.dump(dict(config=dict(asdict(sc), seed=seed), seconds=round(time.time() - t0, 1), final_loss=loss.item()), f)
    log(f"[sft] done in {time.time() - t0:.1f}s, final loss {loss.item():.4f} -> {folder}")
    return folder
