"""Shared pieces of the TRL integration tests (and their 2-process worker): a tiny Llama from a config with an
in-memory character tokenizer, saved to a folder (GRPOTrainer rebuilds its reference model from the model id when
beta > 0), a prompt dataset, and a reward that a random-init model earns about half the time."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789 +=?")


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def save_tiny_model(folder, seed=0, vocab_pad=0, arch="llama"):
    """A 2-layer Llama (D=32, V=43 + vocab_pad) with untied lm_head, saved with its tokenizer; returns folder.
    arch="gemma2": a Gemma-2 of the same size with final_logit_softcapping=2.0 and lm_head scaled so that its
    logits (|z| up to ~4) are bent by the cap."""
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    common = dict(vocab_size=len(tok) + vocab_pad, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  max_position_embeddings=128, pad_token_id=0, eos_token_id=1, bos_token_id=1,
                  tie_word_embeddings=False)
    if arch == "gemma2":
        cfg = Gemma2Config(**common, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                           final_logit_softcapping=2.0, sliding_window=16, attn_implementation="eager")
    else:
        cfg = LlamaConfig(**common, num_attention_heads=4, num_key_value_heads=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = (Gemma2ForCausalLM if arch == "gemma2" else LlamaForCausalLM)(cfg)
    if arch == "gemma2":
        with torch.no_grad():
            model.lm_head.weight.mul_(20.0)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def prompt_dataset(n=8):
    from datasets import Dataset

    return Dataset.from_list([{"prompt": f"{i}+{i + 1}=?"} for i in range(n)])


def reward_len_parity(completions, **kwargs):
    """1 when the completion text has an even number of characters (a random model earns it half the time)."""
    return [1.0 if len(c) % 2 == 0 else 0.0 for c in completions]


def reward_letters(completions, **kwargs):
    """A graded reward, so that advantages vary within a group."""
    return [sum(ch in "aeiou" for ch in c) / 4.0 + (len(c) % 3) / 2.0 for c in completions]


def grpo_config(out_dir, **kw):
    from trl import GRPOConfig

    base = dict(output_dir=out_dir, use_cpu=True, per_device_train_batch_size=4, num_generations=4,
                max_completion_length=8, max_steps=3, learning_rate=1e-2, logging_steps=1, report_to="none",
                save_strategy="no", seed=0, bf16=False, disable_tqdm=True)
    base.update(kw)
    return GRPOConfig(**base)
