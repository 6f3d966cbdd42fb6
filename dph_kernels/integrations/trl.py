"""TRL adapter: `DPHGRPOTrainer`, a `trl.GRPOTrainer` whose log-probs and loss come from dph_kernels.

    from dph_kernels.integrations.trl import DPHGRPOTrainer, build_pef_dataset
    exp_ds, pef_ds = build_pef_dataset(model, tokenizer, train_ds, reward_funcs, n=8)   # once, offline, from pi_ref
    trainer = DPHGRPOTrainer(model=folder, reward_funcs=reward_funcs, args=GRPOConfig(...), train_dataset=exp_ds,
                             processing_class=tokenizer, pef_dataset=pef_ds, dph="dph-js")
    trainer.train()

What changes against `GRPOTrainer` (pinned: trl==1.16.0; the hooks below are private and move between releases):
* Every per-token log-prob TRL asks for (the update, log pi_old, the reference model's) comes from the backbone's
  last hidden states and the lm_head weight through `dk.linear_logprob`: `add_dk_lm_head` replaces the
  `model(..., fused_lm_head=True)` route that TRL patches in with its own chunked kernel.
* Soft-capped and scaled heads (Gemma 2 / 3, Cohere, Granite, Falcon-H1) are read from the model's config and
  passed to the kernels (model_head; checked once against the model's own logits, refused if dk cannot reproduce
  them).
* The loss (`_compute_loss`) is `dk.FusedLinearDPHLoss`, run inside the wrapped model's forward (so DDP / FSDP hooks
  fire as for any forward), for loss_type grpo / bnpo / dr_grpo / dapo / luspo / cispo / sapo / vespo, token- or
  sequence-level importance sampling (GSPO), with TRL's normalisers: epsilon /
  epsilon_high (clip-higher), delta (= dk's dual clip when delta >= 1 + epsilon_high, which TRL recommends),
  beta > 0 with TRL's k3 estimator against its reference model, and vLLM's importance-sampling ratio (folded into
  the advantages: PPO-clip is positively homogeneous in A, so IS * loss(A) = loss(IS * A) for IS >= 0). Logged
  metrics keep TRL's names (entropy, kl, clip_ratio/..., cispo_clip_ratio, vespo/phi_seq_mean). Settings dk does
  not express (off-policy masks, entropy masks or bonus, use_bias_correction_kl, MoE aux loss, vespo with vLLM's
  importance-sampling correction) fall back to TRL's own loss math on dk's log-probs.
* DPH-RL: `pef_dataset=` holds stored pi_ref samples (prompt ids, completion ids, per-token log pi_ref; the format
  `dph-train presample` writes, or `build_pef_dataset`'s) and `dph=` a preset name ("dph-js", "dph-f", "alpha") or a
  `dk.FusedLinearDPHLoss`. Each optimizer step, each process takes `pef_per_step` stored samples (a shuffled pass
  over the set, epoch after epoch), spread over the step's gradient-accumulation micro-batches; those rows get only
  eta * the f-divergence generator on their stored log-probs, aggregated over the step's D_pef tokens (for
  loss_type="grpo": over its D_pef sequences, as grpo aggregates D_exp). The D_exp half — clip, delta, beta —
  always follows GRPOConfig; `dph=` sets only the divergence, eta, alpha, divergence_clamp and impl. Pass only D_exp
  prompts as train_dataset. The stored log-probs are at temperature 1; keep GRPOConfig.temperature = 1.0.
With no stored samples the trainer trains exactly as GRPOTrainer does (tests/test_integration_trl.py).
"""
from __future__ import annotations

import functools
import math
import os
import random
from contextlib import nullcontext

import torch

from .. import _checks
from .. import reference as ref
from ..fused import FusedLinearDPHLoss
from ..linear_logprob import linear_logprob
from .hf_head import head_transform, verify_head

TRL_VERSION = "1.16.0"  # the version these hooks are written and tested against
SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo")
PEF_KEY = "dph_pef"  # where _prepare_inputs puts a micro-batch's stored D_pef rows
IGNORE = -100
_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "num_tiles",
                    "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")
# The aggregation of each TRL loss type in dk's terms (the normaliser is set per micro-batch in _normalizers).
_LOSS_AGG = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dr_grpo": "token-mean", "dapo": "token-mean",
             "luspo": "seq-mean-token-sum", "cispo": "token-mean", "sapo": "seq-mean-token-mean", "vespo": "token-mean"}
# dk's policy_loss of each TRL loss type (reference.POLICY_LOSSES); the rest are PPO-clip with another aggregation.
_POLICY = {"cispo": "cispo", "sapo": "sapo", "vespo": "vespo"}


def _require_trl():
    try:
        import trl
    except ImportError as e:  # pragma: no cover - exercised only without trl
        raise ImportError(f"dph_kernels.integrations.trl needs TRL: pip install 'dph[trl]' (trl=={TRL_VERSION})") from e
    return trl


# ----------------------------------------------------------------------------------------------------------------
# The log-prob route: model(..., fused_lm_head=True) and model(..., dph_loss=fn) through dk
# ----------------------------------------------------------------------------------------------------------------


def model_head(model) -> dict:
    """The model's softcap / logit_scale as dk's keyword arguments (hf_head.head_transform: Gemma 2 / 3's
    final_logit_softcapping, Cohere / Granite / Falcon-H1 logit scales), checked once against the model's own logits
    on a short forward, so a head the kernels cannot reproduce is refused instead of trained on wrong log-probs."""
    cached = getattr(model, "_dk_head", None)
    if cached is None:
        cached = head_transform(model)
        verify_head(model, cached)
        model._dk_head = cached
    return cached


def _head_params(model, dtype):
    head = model.get_output_embeddings()
    weight, bias = head.weight, head.bias
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        DTensor = ()
    if isinstance(weight, DTensor):  # FSDP2 shards parameters as DTensors: gather the head once per call
        weight = weight.full_tensor()
        bias = None if bias is None else bias.full_tensor()
    weight = weight if weight.dtype == dtype else weight.to(dtype)  # under autocast the kernel wants one dtype
    bias = bias if bias is None or bias.dtype == dtype else bias.to(dtype)
    return weight, bias


def add_dk_lm_head(model, temperature=1.0, cast_lm_head_to_fp32=False, outputs=("log_probs",), impl="auto"):
    """Patch `model.forward` (after TRL's own `add_fused_lm_head`) so that

    * `model(input_ids, attention_mask, labels=labels, fused_lm_head=True)` returns TRL's `FusedCausalLMOutput` with
      `log_probs` (and `entropy` when "entropy" is in `outputs`) from `dk.linear_logprob` on the last hidden states
      of the positions whose next-token label is not -100 (lm_head's forward is never called);
    * `model(input_ids, attention_mask, dph_loss=fn)` runs the backbone and returns `fn(hidden, weight, bias)`:
      a loss computed inside the wrapped model's forward, so DDP / FSDP forward hooks fire;
    * any other call is the previous forward (generation is unchanged).
    """
    _require_trl()
    from trl.trainer.utils import FusedCausalLMOutput

    head = model_head(model)
    _checks.check_temperature(temperature)
    _checks.check_impl(impl)
    previous = model.forward
    want_entropy = "entropy" in outputs

    @functools.wraps(type(model).forward)
    def _dk_forward(self, *args, fused_lm_head=False, dph_loss=None, labels=None, shift_labels=None,
                    num_items_in_batch=None, **kwargs):
        if not fused_lm_head and dph_loss is None:
            extra = {k: v for k, v in (("labels", labels), ("shift_labels", shift_labels),
                                       ("num_items_in_batch", num_items_in_batch)) if v is not None}
            return previous(*args, **kwargs, **extra)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        ctx = nullcontext()
        if cast_lm_head_to_fp32:
            hidden = hidden.float()
            ctx = torch.autocast(hidden.device.type, enabled=False)
        weight, bias = _head_params(self, hidden.dtype)
        hidden = hidden.to(weight.device)
        with ctx:
            if dph_loss is not None:
                return dph_loss(hidden, weight, bias)
            if shift_labels is None:
                hidden, labels = hidden[:, :-1], labels[:, 1:]
            else:
                labels = shift_labels
            labels = labels.to(weight.device)
            mask = labels != IGNORE
            # Only the scored positions reach the kernel (TRL scores only the completion).
            out = linear_logprob(hidden[mask], weight, labels[mask], bias=bias, temperature=temperature,
                                 return_entropy=want_entropy, impl=impl, **head)
            out = out if want_entropy else (out, None)
            # masked_scatter keeps the outputs connected to the model even when no label is valid
            log_probs, entropy = (None if x is None else x.new_zeros(mask.shape).masked_scatter(mask, x) for x in out)
        n = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-log_probs.sum() / n, log_probs=log_probs, entropy=entropy, label_mask=mask)

    model.forward = _dk_forward.__get__(model)
    return model


# ----------------------------------------------------------------------------------------------------------------
# Stored pi_ref samples (D_pef)
# ----------------------------------------------------------------------------------------------------------------


def load_pef_dataset(source):
    """D_pef samples as a `datasets.Dataset` with prompt_ids, response_ids (or completion_ids) and ref_logp columns.

    `source`: such a Dataset; a DatasetDict or `dph-train presample` folder (its "pef" split: `<run>/presample`,
    `<run>/presample/data` or `<run>`); or a list of dicts. Checks each row once: a non-empty prompt, one stored
    log-prob per completion token, log-probs <= 0 and finite.
    """
    from datasets import Dataset, DatasetDict, load_from_disk

    ds = source
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        for cand in (path, os.path.join(path, "data"), os.path.join(path, "presample", "data")):
            if os.path.exists(os.path.join(cand, "dataset_dict.json")):
                ds = load_from_disk(cand)
                break
        else:
            raise FileNotFoundError(f"pef_dataset: no `dph-train presample` data under {path!r} "
                                    "(expected <folder>/data/dataset_dict.json)")
    if isinstance(ds, DatasetDict):
        if "pef" not in ds:
            raise ValueError(f"pef_dataset has no 'pef' split (splits: {sorted(ds)}): no stored D_pef samples")
        ds = ds["pef"]
    if isinstance(ds, list):
        ds = Dataset.from_list(ds)
    if not isinstance(ds, Dataset):
        raise TypeError(f"pef_dataset must be a datasets.Dataset, DatasetDict, folder or list of dicts, "
                        f"got {type(source).__name__}")
    if "completion_ids" in ds.column_names and "response_ids" not in ds.column_names:
        ds = ds.rename_column("completion_ids", "response_ids")
    missing = {"prompt_ids", "response_ids", "ref_logp"} - set(ds.column_names)
    if missing:
        raise ValueError(f"pef_dataset lacks column(s) {sorted(missing)} (has {ds.column_names})")
    if len(ds) == 0:
        raise ValueError("pef_dataset is empty")
    cols = ds.select_columns(["prompt_ids", "response_ids", "ref_logp"])
    for i, r in enumerate(cols):
        if not r["prompt_ids"]:
            raise ValueError(f"pef_dataset row {i}: empty prompt_ids")
        if len(r["ref_logp"]) != len(r["response_ids"]):
            raise ValueError(f"pef_dataset row {i}: {len(r['ref_logp'])} ref_logp values for "
                             f"{len(r['response_ids'])} response tokens")
        if any(not (math.isfinite(x) and x <= 0) for x in r["ref_logp"]):
            raise ValueError(f"pef_dataset row {i}: ref_logp must be finite log-probs (<= 0)")
    return ds


class _PefSchedule:
    """Which stored samples each (optimizer step, process, micro-batch) trains on: a pure function of its arguments.

    Step s on process r of w takes draws (s * w + r) * k ... + k - 1 of an endless sequence of shuffled passes over
    the set (pass e shuffled with seed (seed, e)); micro-batch j of the step's GA gets draws [j k / GA, (j+1) k / GA).
    The normaliser is the step's D_pef token count on this process (or its row count for seq-mean aggregation)."""

    def __init__(self, dataset, per_step, seed, count_rows):
        self.ds, self.k, self.seed, self.count_rows = dataset, int(per_step), int(seed), count_rows
        self._orders = {}

    def _order(self, epoch):
        if epoch not in self._orders:
            idx = list(range(len(self.ds)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(idx)
            self._orders = {epoch: idx}  # one pass cached at a time
        return self._orders[epoch]

    def micro_batch(self, step, micro, grad_accum, rank, world):
        n = len(self.ds)
        rows = []
        for d in range((step * world + rank) * self.k, (step * world + rank + 1) * self.k):
            epoch, pos = divmod(d, n)
            r = self.ds[self._order(epoch)[pos]]
            rows.append(dict(prompt_ids=r["prompt_ids"], response_ids=r["response_ids"], ref_logp=r["ref_logp"]))
        norm = sum(1 for r in rows if r["response_ids"]) if self.count_rows else sum(len(r["response_ids"])
                                                                                    for r in rows)
        lo, hi = micro * self.k // grad_accum, (micro + 1) * self.k // grad_accum
        return dict(rows=rows[lo:hi], normalizer=float(max(norm, 1)))


def _encode_prompts(tokenizer, prompts):
    """As GRPOTrainer tokenizes prompts (chat template with a generation prompt for conversational ones)."""
    from trl.data_utils import is_conversational

    if is_conversational({"prompt": prompts[0]}):
        out = tokenizer.apply_chat_template(conversation=prompts, add_generation_prompt=True, tokenize=True,
                                            return_dict=True)
        return [list(x) for x in out["input_ids"]]
    return [list(x) for x in tokenizer(text=list(prompts))["input_ids"]]


def _left_right(prompts, completions, pad_id, device):
    """Left-padded prompts + right-padded completions (the layout GRPOTrainer trains on); targets IGNORE on padding."""
    B, P, C = len(prompts), max(len(p) for p in prompts), max(1, max(len(c) for c in completions))
    ids = torch.full((B, P + C), pad_id, dtype=torch.long)
    attn = torch.zeros((B, P + C), dtype=torch.long)
    targets = torch.full((B, C), IGNORE, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, P - len(p):P] = torch.as_tensor(p, dtype=torch.long)
        attn[i, P - len(p):P] = 1
        if len(c):
            ids[i, P:P + len(c)] = torch.as_tensor(c, dtype=torch.long)
            attn[i, P:P + len(c)] = 1
            targets[i, :len(c)] = torch.as_tensor(c, dtype=torch.long)
    return ids.to(device), attn.to(device), targets.to(device), P


@torch.no_grad()
def score_completions(model, prompts, completions, pad_id, *, batch_size=8, temperature=1.0, impl="auto"):
    """Per-token log pi(completion token | prompt, earlier tokens) as lists, via dk.linear_logprob (no logits)."""
    head = model_head(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for s in range(0, len(prompts), batch_size):
            ids, attn, targets, P = _left_right(prompts[s:s + batch_size], completions[s:s + batch_size], pad_id,
                                                device)
            pos = (attn.cumsum(-1) - 1).clamp(min=0)
            hidden = model.base_model(input_ids=ids, attention_mask=attn, position_ids=pos,
                                      use_cache=False).last_hidden_state
            h = hidden[:, P - 1:P - 1 + targets.shape[1]]
            weight, bias = _head_params(model, h.dtype)
            lp = linear_logprob(h, weight, targets, bias=bias, temperature=temperature, impl=impl, **head)
            out += [lp[i, :len(c)].float().cpu().tolist() for i, c in enumerate(completions[s:s + batch_size])]
    finally:
        model.train(was_training)
    return out


@torch.no_grad()
def _sample(model, tokenizer, prompt_ids, n, *, max_new_tokens, temperature, top_p, batch_size):
    """n sampled completions per prompt (token lists ending at, and including, the first EOS)."""
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    out = []
    for s in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[s:s + batch_size]
        P = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), P), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, p in enumerate(chunk):
            ids[i, P - len(p):] = torch.as_tensor(p)
            attn[i, P - len(p):] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), do_sample=True,
                             temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                             num_return_sequences=n, pad_token_id=pad, eos_token_id=eos)
        for row in gen[:, P:].tolist():
            cut = row.index(eos) + 1 if eos in row else len(row)
            out.append(row[:cut])
    return out


def build_pef_dataset(model, tokenizer, train_dataset, reward_funcs, *, n=8, resample_n=None, threshold=1.0,
                      max_new_tokens=256, temperature=1.0, top_p=0.95, batch_size=8, seed=0, impl="auto"):
    """The DPH-RL data split (method.md) for a TRL prompt dataset: sample n completions per prompt from pi_ref
    (`model` as it is now), reward them with TRL-style `reward_funcs` (summed; a completion is correct when the
    sum >= threshold), call a prompt near-perfect when all n are correct, sample each near-perfect prompt
    `resample_n` (default n) more times and store the correct completions with their per-token log pi_ref
    (temperature 1, through dk.linear_logprob).

    Returns (exp_dataset, pef_dataset): train_dataset's other rows (D_exp, to pass as train_dataset) and the stored
    samples (dph-train presample's "pef" columns: example_id, prompt_ids, response_ids, ref_logp, text, correct).
    """
    from datasets import Dataset, Features, List, Value

    if not callable(reward_funcs) and not isinstance(reward_funcs, (list, tuple)):
        raise TypeError("reward_funcs must be a callable or a list of callables (TRL's reward-function signature)")
    funcs = [reward_funcs] if callable(reward_funcs) else list(reward_funcs)
    if not funcs or not all(callable(f) for f in funcs):
        raise TypeError("reward_funcs must be callables: f(prompts, completions, completion_ids, **columns)")
    if "prompt" not in train_dataset.column_names:
        raise ValueError("train_dataset needs a 'prompt' column (TRL's prompt-only format)")
    if not (isinstance(n, int) and n >= 1):
        raise ValueError(f"n must be a positive int, got {n!r}")
    resample_n = n if resample_n is None else resample_n
    rows = train_dataset.to_list()
    prompts = [r["prompt"] for r in rows]
    prompt_ids = _encode_prompts(tokenizer, prompts)
    from trl.data_utils import is_conversational
    chat = is_conversational({"prompt": prompts[0]})

    def rewards(idx, comp_ids):
        texts = tokenizer.batch_decode(comp_ids, skip_special_tokens=True)
        comps = [[{"role": "assistant", "content": t}] for t in texts] if chat else texts
        cols = {k: [rows[i][k] for i in idx] for k in rows[0] if k != "prompt"}
        total = torch.zeros(len(idx), dtype=torch.float64)
        for f in funcs:
            r = f(prompts=[prompts[i] for i in idx], completions=comps, completion_ids=comp_ids, **cols)
            total += torch.tensor([0.0 if v is None else float(v) for v in r], dtype=torch.float64)
        return texts, (total >= threshold).tolist()

    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, batch_size=batch_size)
    torch.manual_seed(seed)
    comp = _sample(model, tokenizer, prompt_ids, n, **kw)
    _, ok = rewards([i for i in range(len(rows)) for _ in range(n)], comp)
    pef_idx = [i for i in range(len(rows)) if all(ok[i * n:(i + 1) * n])]
    exp_idx = [i for i in range(len(rows)) if i not in set(pef_idx)]
    stored = []
    if pef_idx and resample_n > 0:
        torch.manual_seed(seed + 1)
        comp2 = _sample(model, tokenizer, [prompt_ids[i] for i in pef_idx], resample_n, **kw)
        owner = [i for i in pef_idx for _ in range(resample_n)]
        texts, ok2 = rewards(owner, comp2)
        keep = [k for k in range(len(comp2)) if ok2[k] and comp2[k]]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        ref = score_completions(model, [prompt_ids[owner[k]] for k in keep], [comp2[k] for k in keep], pad,
                                batch_size=batch_size, impl=impl)
        stored = [dict(example_id=str(owner[k]), prompt_ids=prompt_ids[owner[k]], response_ids=comp2[k],
                       ref_logp=lp, text=texts[k], correct=True) for k, lp in zip(keep, ref)]
    features = Features(dict(example_id=Value("string"), prompt_ids=List(Value("int64")),
                             response_ids=List(Value("int64")), ref_logp=List(Value("float32")),
                             text=Value("string"), correct=Value("bool")))
    pef = Dataset.from_dict({k: [r[k] for r in stored] for k in features}, features=features)
    return train_dataset.select(exp_idx), pef


# ----------------------------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------------------------


def _divergence_cfg(dph):
    """The D_pef part of a dph= argument: a preset name or a FusedLinearDPHLoss."""
    if dph is None:
        return dict(divergence=None)
    if isinstance(dph, str):
        cfg = FusedLinearDPHLoss.preset(dph).cfg
    elif isinstance(dph, FusedLinearDPHLoss):
        cfg = dph.cfg
    else:
        raise TypeError(f"dph must be a preset name or a dk.FusedLinearDPHLoss, got {type(dph).__name__}")
    if cfg["divergence_mode"] != "sampled":
        raise ValueError("dph: divergence_mode='exact' needs a live reference head; the TRL trainer trains on stored "
                         "pi_ref samples (divergence_mode='sampled')")
    return {k: cfg[k] for k in ("divergence", "eta", "alpha", "divergence_clamp", "impl")}


def _build_trainer_class():
    _require_trl()
    from accelerate.utils import is_peft_model
    from trl import GRPOTrainer
    from trl.trainer.utils import nanmax, nanmin

    class DPHGRPOTrainer(GRPOTrainer):
        """GRPOTrainer with dph_kernels log-probs and loss, and optional DPH-RL on stored pi_ref samples.

        Extra keyword arguments (everything else is GRPOTrainer's):
            pef_dataset: stored D_pef samples (see load_pef_dataset), or None for plain GRPO / DAPO / ... via dk.
            dph: preset name ("dph-js", "dph-f", "alpha") or dk.FusedLinearDPHLoss; sets the divergence of D_pef rows.
            pef_per_step: stored samples per optimizer step and process (default: per_device_train_batch_size).
        See the module docstring.
        """

        def __init__(self, *args, pef_dataset=None, dph=None, pef_per_step=None, **kwargs):
            super().__init__(*args, **kwargs)
            div = _divergence_cfg(dph)
            self._dk_fallback = self._unsupported_settings()
            if pef_dataset is not None:
                if div["divergence"] is None:
                    raise ValueError("pef_dataset needs dph= with a divergence (e.g. dph='dph-js'): its rows are "
                                     "trained on the f-divergence to pi_ref")
                if self._dk_fallback:
                    raise ValueError(f"pef_dataset (DPH-RL) needs dk's loss, which does not express "
                                     f"{', '.join(self._dk_fallback)}")
            delta = self.args.delta
            policy = _POLICY.get(self.loss_type, "ppo")
            a = self.args
            target = self.model.get_base_model() if is_peft_model(self.model) else self.model
            self.dph_loss = FusedLinearDPHLoss(
                **div, clip_low=self.epsilon_low,
                clip_high=self.epsilon_high, cispo_max_weight=self.epsilon_high if policy == "cispo" else None,
                dual_clip=delta if (delta is not None and policy == "ppo" and not self._dk_fallback) else None,
                kl_beta=self.beta, kl_estimator="k3", loss_agg=_LOSS_AGG.get(self.loss_type, "token-mean"),
                temperature=self.temperature, log_entropy=True, policy_loss=policy,
                importance_sampling_level=self.importance_sampling_level,
                sapo_temperature_pos=a.sapo_temperature_pos, sapo_temperature_neg=a.sapo_temperature_neg,
                vespo_k_pos=a.vespo_k_pos, vespo_lambda_pos=a.vespo_lambda_pos, vespo_k_neg=a.vespo_k_neg,
                vespo_lambda_neg=a.vespo_lambda_neg, **model_head(target))
            self._pef = None
            if pef_dataset is not None:
                per_step = self.args.per_device_train_batch_size if pef_per_step is None else pef_per_step
                if not (isinstance(per_step, int) and per_step >= 1):
                    raise ValueError(f"pef_per_step must be a positive int, got {per_step!r}")
                self._pef = _PefSchedule(load_pef_dataset(pef_dataset), per_step, self.args.seed,
                                         count_rows=self.loss_type == "grpo")
            add_dk_lm_head(target, temperature=self.temperature, cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32,
                           outputs=("log_probs", "entropy"), impl=div.get("impl", "auto"))
            if self.ref_model is not None:
                add_dk_lm_head(self.ref_model, temperature=self.temperature,
                               cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32, impl=div.get("impl", "auto"))

        def _unsupported_settings(self):
            a, out = self.args, []
            if self.loss_type not in SUPPORTED_LOSS_TYPES:
                out.append(f"loss_type={self.loss_type!r}")
            if self.loss_type == "vespo" and self.use_vllm and self.vllm_importance_sampling_correction:
                out.append("vespo with vLLM's importance-sampling correction (inside its sequence weight)")
            if self.off_policy_mask_threshold is not None:
                out.append("off_policy_mask_threshold")
            if self.top_entropy_quantile < 1.0:
                out.append("top_entropy_quantile < 1")
            if self._entropy_bonus_enabled:
                out.append("an entropy bonus (entropy_coef / adaptive entropy)")
            if self.aux_loss_enabled:
                out.append("the MoE router aux loss")
            if self.beta != 0.0 and a.use_bias_correction_kl:
                out.append("use_bias_correction_kl")
            if (a.delta is not None and _POLICY.get(self.loss_type, "ppo") == "ppo"
                    and not (a.delta > 1 and a.delta >= 1 + self.epsilon_high)):
                out.append(f"delta={a.delta} < 1 + epsilon_high (not a dual clip)")
            return out

        # ---------------------------------------------------------------- D_pef rows into each micro-batch
        def _prepare_inputs(self, generation_batch):
            inputs = super()._prepare_inputs(generation_batch)
            if self._pef is not None and self.model.training:
                ga = self.current_gradient_accumulation_steps
                step, micro = divmod(self._step, ga)
                inputs = {**inputs, PEF_KEY: self._pef.micro_batch(step, micro, ga, self.accelerator.process_index,
                                                                   self.accelerator.num_processes)}
            return inputs

        # ---------------------------------------------------------------- the loss
        def _compute_loss(self, model, inputs):
            pef = inputs.get(PEF_KEY)
            multimodal = [k for k in _MULTIMODAL_KEYS if inputs.get(k) is not None]
            if self._dk_fallback or multimodal:
                if pef is not None and pef["rows"]:
                    raise ValueError(f"D_pef rows need dk's loss, which does not take {multimodal}")
                return super()._compute_loss(model, inputs)  # TRL's loss math, on dk's log-probs
            mode = "train" if self.model.training else "eval"
            b = self._dk_batch(inputs, pef)
            P, C = b["prompt_len"], b["targets"].shape[1]

            def loss_in_forward(hidden, weight, bias):
                return self.dph_loss(hidden[:, P - 1:P - 1 + C], weight, b["targets"], b["loss_mask"], b["is_pef"],
                                     advantages=b["advantages"], old_logp=b["old_logp"], ref_logp=b["ref_logp"],
                                     online_ref_logp=b["online_ref_logp"], bias=bias,
                                     normalizer=self._normalizers(inputs, b, mode))

            with self.accelerator.autocast():
                out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], dph_loss=loss_in_forward)
            self._log_dk_metrics(out, inputs, b, mode)
            return out.loss

        def _dk_batch(self, inputs, pef):
            """The micro-batch as dk wants it: TRL's rows first, then the stored D_pef rows (left-padded prompts,
            right-padded completions, one layout); without D_pef rows exactly TRL's tensors."""
            p_ids, p_mask = inputs["prompt_ids"], inputs["prompt_mask"]
            c_ids, c_mask = inputs["completion_ids"], inputs["completion_mask"]
            mask = c_mask if "tool_mask" not in inputs else c_mask * inputs["tool_mask"]
            B, P = p_ids.shape
            C = c_ids.shape[1]
            dev = p_ids.device
            adv = inputs["advantages"]
            adv = (adv.unsqueeze(1) if adv.dim() == 1 else adv).float()
            sign_adv = adv
            if self.use_vllm and self.vllm_importance_sampling_correction:
                # TRL: loss_t * IS_t. IS >= 0 and PPO-clip (dual clip included) is positively homogeneous in A.
                adv = adv * inputs["importance_sampling_ratio"]
            adv = adv.expand(B, C)
            old = inputs.get("old_per_token_logps")
            oref = inputs.get("ref_per_token_logps") if self.beta != 0.0 else None
            rows = [] if pef is None else pef["rows"]
            b = dict(prompt_len=P, n_exp=B, sign_adv=sign_adv.expand(B, C))
            if not rows:
                b.update(input_ids=torch.cat([p_ids, c_ids], 1), attention_mask=torch.cat([p_mask, c_mask], 1),
                         targets=c_ids, loss_mask=mask.bool(), is_pef=torch.zeros(B, dtype=torch.bool, device=dev),
                         advantages=adv, old_logp=old, ref_logp=None, online_ref_logp=oref)
                return b
            pad = self._tokenizer.pad_token_id
            ids_p, attn_p, tgt_p, P_p = _left_right([r["prompt_ids"] for r in rows], [r["response_ids"] for r in rows],
                                                    pad, dev)
            C_p = tgt_p.shape[1]
            P2, C2 = max(P, P_p), max(C, C_p)
            F = torch.nn.functional

            def lr_pad(x, p_len, c_len, value):  # [prompt | completion] columns to [P2 | C2]
                return torch.cat([F.pad(x[:, :p_len], (P2 - p_len, 0), value=value),
                                  F.pad(x[:, p_len:], (0, C2 - c_len), value=value)], 1)

            def right(x, value=0.0):
                return None if x is None else F.pad(x, (0, C2 - x.shape[1]), value=value)

            Bp = len(rows)
            ref_p = torch.zeros((Bp, C_p), dtype=torch.float32)
            for i, r in enumerate(rows):
                ref_p[i, :len(r["ref_logp"])] = torch.as_tensor(r["ref_logp"], dtype=torch.float32)
            zeros_p = torch.zeros((Bp, C2), dtype=torch.float32, device=dev)
            b["prompt_len"] = P2
            b.update(
                input_ids=torch.cat([lr_pad(torch.cat([p_ids, c_ids], 1), P, C, pad), lr_pad(ids_p, P_p, C_p, pad)]),
                attention_mask=torch.cat([lr_pad(torch.cat([p_mask, c_mask], 1), P, C, 0),
                                          lr_pad(attn_p, P_p, C_p, 0)]),
                targets=torch.cat([right(c_ids, pad), right(tgt_p, IGNORE)]),
                loss_mask=torch.cat([right(mask).bool(), right(tgt_p != IGNORE)]),
                is_pef=torch.cat([torch.zeros(B, dtype=torch.bool, device=dev),
                                  torch.ones(Bp, dtype=torch.bool, device=dev)]),
                advantages=torch.cat([right(adv), zeros_p]),
                old_logp=None if old is None else torch.cat([right(old), zeros_p]),
                ref_logp=torch.cat([torch.zeros((B, C2), device=dev), right(ref_p.to(dev))]),
                online_ref_logp=None if oref is None else torch.cat([right(oref), zeros_p]),
                sign_adv=right(b["sign_adv"]), pef_normalizer=pef["normalizer"])
            return b

        def _normalizers(self, inputs, b, mode):
            """TRL's denominator of each loss type, in dk's terms (see _LOSS_AGG), and the D_pef one."""
            ga = self.current_gradient_accumulation_steps if mode == "train" else 1.0
            B = b["n_exp"]
            exp_mask = b["loss_mask"][:B]
            if self.loss_type in ("grpo", "sapo", "luspo"):
                n = B * ga
            elif self.loss_type == "bnpo":
                n = float(exp_mask.sum().clamp(min=1)) * ga
            elif self.loss_type == "dr_grpo":
                n = B * self.max_completion_length * ga
            else:  # dapo, cispo, vespo: num_items_in_batch spans the generation batch; one accumulation window
                n = float(inputs["num_items_in_batch"].clamp(min=1.0)) / self.accelerator.num_processes
                if mode == "train":
                    n = n * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            norm = {"exp": float(n)}
            if "pef_normalizer" in b:
                norm["pef"] = b["pef_normalizer"]
            return norm

        def _log_dk_metrics(self, out, inputs, b, mode):
            """TRL's metric names and definitions, on the D_exp rows."""
            B = b["n_exp"]
            mask = (b["loss_mask"][:B]).float()
            logp = out.logp[:B]
            old = b["old_logp"][:B] if b["old_logp"] is not None else logp
            metrics = self._metrics[mode]

            def global_mean(total, count):
                t = self.accelerator.reduce(torch.stack([total, count]).float(), reduction="sum")
                return (t[0] / t[1].clamp(min=1.0)).item()

            def gmm(x):
                return global_mean((x * mask).sum(), mask.sum())

            if self.beta != 0.0:
                oref = b["online_ref_logp"][:B]
                metrics["kl"].append(gmm(torch.expm1(oref - logp) - (oref - logp)))  # TRL's k3
            n_exp = torch.tensor(float(out.metrics["n_tokens_exp"]), device=logp.device)
            ent_sum = torch.tensor(out.metrics.get("entropy_mean_exp", 0.0), device=logp.device) * n_exp
            metrics["entropy"].append(global_mean(ent_sum, n_exp))
            policy, adv = _POLICY.get(self.loss_type, "ppo"), b["sign_adv"][:B]
            per_seq = self.importance_sampling_level == "sequence"

            def mean_of(x, one_per_row):  # TRL: a (B, 1) quantity is averaged over rows, a (B, T) one over tokens
                return global_mean(x[:, 0].sum(), torch.tensor(float(B), device=x.device)) if one_per_row else gmm(x)

            def row_values(x, one_per_row):
                return x[:, 0] if one_per_row else (x * mask).sum(-1) / mask.sum(-1)

            log_ratio = logp - old
            if policy == "vespo":  # TRL logs the mean sequence weight
                phi, _ = ref.vespo_weight(log_ratio, adv, mask, self.dph_loss.cfg)
                metrics["vespo/phi_seq_mean"].append(mean_of(phi, True))
            if per_seq:
                log_ratio = ref.sequence_log_ratio(log_ratio, mask)
            coef_1 = torch.exp(log_ratio)
            if policy == "cispo":
                metrics["cispo_clip_ratio"].append(mean_of(((coef_1 > self.epsilon_high) & (adv > 0)).float(),
                                                           per_seq))
            if policy == "ppo":
                if self.args.delta is not None:
                    coef_1 = torch.clamp(coef_1, max=self.args.delta)
                low = ((coef_1 < 1 - self.epsilon_low) & (adv < 0)).float()
                high = ((coef_1 > 1 + self.epsilon_high) & (adv > 0)).float()
                metrics["clip_ratio/low_mean"].append(mean_of(low, per_seq))
                metrics["clip_ratio/high_mean"].append(mean_of(high, per_seq))
                metrics["clip_ratio/region_mean"].append(mean_of(torch.maximum(low, high), per_seq))
                metrics["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(row_values(low, per_seq))).item())
                metrics["clip_ratio/high_max"].append(
                    nanmax(self.accelerator.gather(row_values(high, per_seq))).item())
            if self._pef is not None and mode == "train":
                n_pef = torch.tensor(float(out.metrics["n_tokens_pef"]), device=logp.device)
                div_sum = torch.tensor(out.metrics["divergence_mean"], device=logp.device) * n_pef
                metrics["dph/divergence_mean"].append(global_mean(div_sum, n_pef))
                # L_pef of the step: micro-batch parts sum to it, and TRL logs the mean over the window's parts
                part = torch.tensor(out.metrics["loss_pef"] * self.current_gradient_accumulation_steps,
                                    device=logp.device)
                metrics["dph/loss_pef"].append(self.accelerator.gather(part).mean().item())
                metrics["dph/pef_tokens"].append(self.accelerator.gather(n_pef).sum().item())

    DPHGRPOTrainer.__module__ = __name__
    return DPHGRPOTrainer


def __getattr__(name):
    if name == "DPHGRPOTrainer":
        cls = _build_trainer_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
