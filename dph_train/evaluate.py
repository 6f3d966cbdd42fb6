"""Evaluation: Greedy accuracy and unbiased Pass@k (n samples per prompt, T=1.0, top_p=0.95) per split, saved as
<run>/eval/<tag>.json, plus a PNG of Pass@k vs k with one line per (tag, split), and the markdown report.

Tasks with prompt categories (styles: all-valid / single-style) also get every number per category group
("by_category"), and the styles task gets the policy's exact first-token (style word) distribution per prompt
("style_first_token_probs"): a 4+1-way distribution, cheap, from which exact KLs between checkpoints follow."""
from __future__ import annotations

import json
import math
import os
import time
from collections import Counter

import torch

from .batching import score_sequences
from .common import encode_prompt, write_json
from .passk import mean_pass_at_k


def evaluate(cfg, model, tokenizer, task, engine, run, tag: str) -> dict:
    ec = cfg.eval
    max_new = ec.max_new_tokens or cfg.rollout.max_new_tokens
    t0 = time.time()
    result = dict(tag=tag, n=ec.n, ks=list(ec.ks), temperature=ec.temperature, top_p=ec.top_p,
                  max_new_tokens=max_new, splits={})
    for split in ec.splits:
        examples = task.examples(split)
        if ec.max_prompts is not None:
            examples = examples[:ec.max_prompts]
        if not examples:
            continue
        prompts = [encode_prompt(tokenizer, ex.prompt, cfg.task) for ex in examples]
        res = dict(n_prompts=len(examples))
        if ec.greedy:
            rb = engine.generate(prompts, n=1, greedy=True, max_new_tokens=max_new, desc=f"eval {tag}/{split} greedy")
            sc = [task.score(ex, t) for ex, t in zip(examples, rb.texts)]
            res["greedy"] = sum(s.reward >= 1.0 for s in sc) / len(sc)
            res["greedy_reasons"] = dict(Counter(s.reason for s in sc))
        torch.manual_seed(cfg.seed * 104_729 + 17)
        kw = dict(seed=cfg.seed * 104_729 + 17) if engine.name == "vllm" else {}
        rb = engine.generate(prompts, n=ec.n, temperature=ec.temperature, top_p=ec.top_p, max_new_tokens=max_new,
                             desc=f"eval {tag}/{split} n={ec.n}", **kw)
        counts, reasons = [], Counter()
        for i, ex in enumerate(examples):
            sc = [task.score(ex, rb.texts[i * ec.n + j]) for j in range(ec.n)]
            counts.append(sum(s.reward >= 1.0 for s in sc))
            reasons.update(s.reason for s in sc)
        pk = mean_pass_at_k(counts, ec.n, ec.ks)
        res["pass_at_k"] = {str(k): v for k, v in pk.items()}
        res["sample_accuracy"] = sum(counts) / (len(counts) * ec.n)
        res["correct_counts"] = counts
        res["reasons"] = dict(reasons)
        res["mean_response_tokens"] = rb.n_response_tokens / len(rb)
        style_of = getattr(task, "style_of", None)
        styles = None
        if callable(style_of):  # tasks with answer styles: how diverse are the samples?
            styles = [str(style_of(t)) for t in rb.texts]
            res["style_counts"] = dict(Counter(styles))
            res["style_entropy"] = entropy_bits(Counter(styles))  # of the split's samples pooled
            # mean over prompts of the entropy of one prompt's n samples: a policy that learned which style each
            # prompt needs has a high pooled entropy but a low per-prompt one
            res["style_entropy_per_prompt"] = sum(entropy_bits(Counter(styles[i * ec.n:(i + 1) * ec.n]))
                                                  for i in range(len(examples))) / len(examples)
        category_group = getattr(task, "category_group", None)
        if callable(category_group):  # the pooled numbers mix prompt kinds that move in opposite directions
            groups = [category_group(ex) for ex in examples]
            res["categories"] = groups
            res["by_category"] = {g: _group_stats([i for i, x in enumerate(groups) if x == g], counts, styles, ec)
                                  for g in sorted({x for x in groups if x is not None})}
        if getattr(task, "name", None) == "styles" and hasattr(task, "STYLES"):
            res["style_first_token_names"] = list(task.STYLES) + ["other"]
            res["style_first_token_probs"] = first_token_probs(cfg, model, tokenizer, prompts, task.STYLES)
        result["splits"][split] = res
        run.log(f"[eval {tag}] {split}: greedy={res.get('greedy', float('nan')):.3f} "
                + " ".join(f"pass@{k}={v:.3f}" for k, v in pk.items())
                + (f" style_entropy={res['style_entropy']:.2f} bits" if "style_entropy" in res else ""))
    result["seconds"] = round(time.time() - t0, 1)
    write_json(run.p("eval", f"{tag}.json"), result)
    plot_passk(run.p("eval"))
    return result


def _group_stats(idx: list, counts: list, styles: list | None, ec) -> dict:
    """The split's numbers restricted to the prompts `idx` (one category group)."""
    sub = [counts[i] for i in idx]
    pk = mean_pass_at_k(sub, ec.n, ec.ks)
    accuracy = sum(sub) / (len(sub) * ec.n)
    # the unbiased Pass@1 is the sample accuracy, so it is there even when 1 is not among eval.ks
    out = {"n_prompts": len(idx), "pass_at_k": {str(k): v for k, v in pk.items()}, "pass@1": pk.get(1, accuracy)}
    if 16 in pk:
        out["pass@16"] = pk[16]
    out["sample_accuracy"] = accuracy
    if styles is not None:
        per_prompt = [styles[i * ec.n:(i + 1) * ec.n] for i in idx]
        out["style_entropy"] = entropy_bits(Counter(s for p in per_prompt for s in p))
        out["style_entropy_per_prompt"] = sum(entropy_bits(Counter(p)) for p in per_prompt) / len(idx)
    return out


def first_token_probs(cfg, model, tokenizer, prompts: list, words) -> list:
    """Per prompt, the policy's probability (temperature 1, no top-p) that the response starts with each of `words`,
    then "other" (1 - their sum, clamped at 0): exact, with no sampling noise. Each word must be one token; every
    (prompt, word) pair is scored as a one-token response by the project's own fused log-prob (no logits)."""
    ids = []
    for w in words:
        t = tokenizer(w, add_special_tokens=False)["input_ids"]
        if len(t) != 1:
            raise ValueError(f"first-token style distribution: style word {w!r} is {len(t)} tokens ({t}) with this "
                             "tokenizer, expected exactly one")
        ids.append(t)
    device = next(model.parameters()).device
    logps = score_sequences(model, [p for p in prompts for _ in ids], [t for _ in prompts for t in ids],
                            tokenizer.pad_token_id, cfg.model, device, batch_size=512)
    out = []
    for i in range(len(prompts)):
        probs = [math.exp(lp[0]) for lp in logps[i * len(ids):(i + 1) * len(ids)]]
        out.append(probs + [max(0.0, 1.0 - sum(probs))])
    return out


def entropy_bits(counts: Counter) -> float:
    """Entropy (bits) of a distribution given by counts; a response with no style counts as one more category
    ("None"), so a policy that stops writing a style word is not scored as diverse."""
    n = sum(counts.values())
    return max(0.0, -sum(c / n * math.log2(c / n) for c in counts.values() if c)) if n else 0.0


def load_evals(folder: str) -> dict:
    out = {}
    if not os.path.isdir(folder):
        return out
    for f in sorted(os.listdir(folder)):
        if f.endswith(".json"):
            with open(os.path.join(folder, f)) as fh:
                out[f[:-5]] = json.load(fh)
    return out


def _tag_order(tags):
    return sorted(tags, key=lambda t: (t != "base", t == "final", t))


def plot_passk(folder: str, out_name: str = "passk.png") -> str | None:
    evals = load_evals(folder)
    if not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = sorted({s for e in evals.values() for s in e["splits"]}, key=lambda s: ({"test": 0, "ood": 1}.get(s, 2), s))
    fig, axes = plt.subplots(1, len(splits), figsize=(5 * len(splits), 4), squeeze=False)
    for ax, split in zip(axes[0], splits):
        for tag in _tag_order(evals):
            res = evals[tag]["splits"].get(split)
            if not res:
                continue
            ks = sorted(int(k) for k in res["pass_at_k"])
            ax.plot(ks, [res["pass_at_k"][str(k)] for k in ks], marker="o", label=tag)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k")
        ax.set_ylabel("Pass@k")
        ax.set_title(split)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = os.path.join(folder, out_name)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def table_rows(evals: dict, ks=(1, 8)) -> list:
    rows = []
    for tag in _tag_order(evals):
        for split, res in evals[tag]["splits"].items():
            row = dict(tag=tag, split=split, greedy=res.get("greedy"))
            for k in ks:
                row[f"pass@{k}"] = res["pass_at_k"].get(str(k))
            rows.append(row)
    return rows


def format_table(evals: dict, ks=(1, 8)) -> str:
    head = "| checkpoint | split | Greedy | " + " | ".join(f"Pass@{k}" for k in ks) + " |"
    sep = "|---|---|---|" + "---|" * len(ks)
    lines = [head, sep]
    fmt = lambda v: "n/a" if v is None else f"{100 * v:.1f}"  # noqa: E731
    for r in table_rows(evals, ks):
        lines.append(f"| {r['tag']} | {r['split']} | {fmt(r['greedy'])} | "
                     + " | ".join(fmt(r[f'pass@{k}']) for k in ks) + " |")
    return "\n".join(lines)


def write_report(cfg, run, extra: dict | None = None) -> str:
    """<run>/report.md: what ran, the Greedy / Pass@k table (percent), the plot, presample and training summaries."""
    from .common import read_jsonl

    evals = load_evals(run.p("eval"))
    ks_all = sorted({int(k) for e in evals.values() for s in e["splits"].values() for k in s["pass_at_k"]})
    ks_main = [k for k in (1, 8) if k in ks_all] or ks_all[:2]
    lines = [f"# DPH-RL run: {cfg.train.method} on {cfg.task.name} ({cfg.model.name})", ""]
    extra = extra or {}
    if extra.get("wall_seconds") is not None:
        lines.append(f"Wall time: {extra['wall_seconds']:.0f} s on {extra.get('device', '?')}.")
        lines.append("")
    lines += ["## Greedy / Pass@k (%)", "", format_table(evals, ks_main), ""]
    if len(ks_all) > len(ks_main):
        lines += ["All k:", "", format_table(evals, ks_all), ""]
    ec = cfg.eval
    lines += [f"Pass@k is the unbiased estimator from n={ec.n} samples per prompt (T={ec.temperature}, "
              f"top_p={ec.top_p}); Greedy is one greedy decode per prompt; "
              f"{'all' if ec.max_prompts is None else f'the first {ec.max_prompts}'} prompts of each split.", "",
              "![Pass@k](eval/passk.png)", ""]
    ps = run.p("presample", "summary.json")
    if os.path.exists(ps):
        with open(ps) as f:
            s = json.load(f)
        lines += ["## Pre-sampling (pi_ref)", "",
                  f"{s['n_prompts']} training prompts x n={s['n']}: sample accuracy {100 * s['sample_accuracy']:.1f}%, "
                  f"D_exp={s['n_exp']} prompts, D_pef={s['n_pef']} prompts (threshold {s['pef_threshold']}), "
                  f"{s['n_pef_samples']} stored pi_ref samples ({s['pef_sample_tokens']} tokens).", ""]
    recs = [r for r in read_jsonl(run.p("metrics.jsonl")) if "step" in r]
    if recs:
        first, last = recs[0], recs[-1]
        tot = sum(r.get("time_step", 0) for r in recs)
        lines += ["## Training", "",
                  f"{len(recs)} steps of {cfg.train.method} ({tot:.0f} s of steps); reward mean first/last step "
                  f"{first.get('reward_mean')} / {last.get('reward_mean')}; see metrics.jsonl for every step.", "",
                  "| step | reward | loss | grad norm | entropy | s/step |", "|---|---|---|---|---|---|"]
        for r in recs:
            f3 = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
            lines.append(f"| {r['step']} | {f3(r.get('reward_mean'))} | {f3(r.get('loss'))} | "
                         f"{f3(r.get('grad_norm'))} | {f3(r.get('entropy'))} | {r.get('time_step', 0):.1f} |")
        lines.append("")
    path = run.p("report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path
