"""Tables, checks and plots of a `dph-train compare` run, from its compare.json alone (so a report can be rebuilt)."""
from __future__ import annotations

import os
import statistics

from .common import read_jsonl

SPLITS = ("test", "ood-remap", "ood-shift")  # the pooled tables; the T2 probes get their own
PROBES = ("t2a", "t2b")
# The job's versions: anything in the evaluation changed after seeing results is a new version, listed here.
JOB_VERSIONS = {1: "pre-registered before the first run (2026-12-08): arms by compare.variants, per-category metrics, "
                   "realised KL, keep / explore, ood-remap / ood-shift, T2 probes, verdict rules of compare_claims.py"}
METRICS = (("pass@1", "Pass@1", 100), ("pass@16", "Pass@16", 100), ("greedy", "Greedy", 100),
           ("style_entropy", "Style entropy (bits)", 1), ("style_entropy_per_prompt", "per prompt (bits)", 1))


def values(cmp: dict, method: str, split: str, metric: str) -> list:
    """Per-seed values in seed order (seeds missing for this method are skipped)."""
    per_seed = cmp["results"].get(method, {})
    return [per_seed[str(s)][split][metric] for s in cmp["seeds"] if str(s) in per_seed]


def paired(cmp: dict, method: str, other: str, split: str, metric: str) -> list:
    a, b = cmp["results"].get(method, {}), cmp["results"].get(other, {})
    return [a[str(s)][split][metric] - b[str(s)][split][metric] for s in cmp["seeds"] if str(s) in a and str(s) in b]


def mean_sd(xs: list, scale: float = 1.0, signed: bool = False) -> str:
    if not xs:
        return "n/a"
    m = statistics.mean(xs) * scale
    sd = statistics.stdev(xs) * scale if len(xs) > 1 else 0.0
    digits = 1 if scale == 100 else 2
    return f"{m:+.{digits}f} ± {sd:.{digits}f}" if signed else f"{m:.{digits}f} ± {sd:.{digits}f}"


def agree(xs: list) -> str:
    """How many seeds agree with the sign of the mean difference."""
    if not xs:
        return ""
    m = statistics.mean(xs)
    if m == 0:
        return f"{sum(1 for x in xs if x == 0)}/{len(xs)} equal"
    n = sum(1 for x in xs if (x > 0) == (m > 0) and x != 0)
    return f"{n}/{len(xs)} {'up' if m > 0 else 'down'}"


def checks(cmp: dict) -> list:
    """The issue's acceptance numbers, evaluated on this run: (statement, holds, evidence)."""
    out = []
    seeds = [str(s) for s in cmp["seeds"]]
    base = cmp["results"].get("base", {})
    for m in ("grpo", "dapo"):
        r = cmp["results"].get(m)
        if not r:
            continue
        ok, ev = [], []
        for s in seeds:
            if s not in r or s not in base:
                continue
            t, b = r[s]["test"], base[s]["test"]
            ok.append(t["pass@16"] <= b["pass@16"] - 0.20 and t["style_entropy"] < 0.5 and t["pass@1"] > b["pass@1"])
            ev.append(f"seed {s}: Pass@16 {100 * t['pass@16']:.1f} vs base {100 * b['pass@16']:.1f}, entropy "
                      f"{t['style_entropy']:.2f} bits, Pass@1 {100 * t['pass@1']:.1f} vs base {100 * b['pass@1']:.1f}")
        out.append((f"collapse: {m} test Pass@16 >= 20 points below base, style entropy < 0.5 bits and Pass@1 above "
                    f"base, on every seed ({sum(ok)}/{len(ok)})", bool(ok) and all(ok), "; ".join(ev)))
    grpo = cmp["results"].get("grpo", {})
    for m in ("dph-f", "dph-js"):
        r = cmp["results"].get(m)
        if not r:
            continue
        d16 = paired(cmp, m, "base", "test", "pass@16")
        d1 = paired(cmp, m, "grpo", "test", "pass@1") if grpo else []
        n_ge = sum(1 for x in d1 if x >= 0)
        holds = bool(d16) and statistics.mean(d16) >= -0.10 and n_ge * 3 >= 2 * max(1, len(d1))
        out.append((f"cure: {m} test Pass@16 >= base - 10 points (mean) and Pass@1 >= grpo's on >= 2/3 of seeds",
                    holds, f"Pass@16 - base = {mean_sd(d16, 100, True)} points; Pass@1 >= grpo on {n_ge}/{len(d1)}"))
    return out


def _table(cmp: dict, split: str) -> list:
    if not any(split in r for v in cmp["results"].values() for r in v.values()):
        return []  # a split this run did not evaluate (the real-model run: no ood-remap)
    lines = [f"### {split}", "", "| method | " + " | ".join(h for _, h, _ in METRICS) + " |",
             "|---|" + "---|" * len(METRICS)]
    for m in cmp["methods"]:
        if cmp["results"].get(m):
            lines.append(f"| {m} | " + " | ".join(mean_sd(values(cmp, m, split, k), sc) for k, _, sc in METRICS) + " |")
    return lines + [""]


def _cat(cmp, m, s, group, key):
    r = cmp["results"][m][s]["test"]
    return r.get("by_category", {}).get(group, {}).get(key) if group else r.get(key)


def _category_table(cmp: dict) -> list:
    """The numbers the claims read: per arm, single-style Pass@1 / @16, all-valid entropy, realised KL, keep /
    explore on the test split (mean ± sd over seeds)."""
    cols = (("single-style", "pass@1", "single Pass@1", 100), ("single-style", "pass@16", "single Pass@16", 100),
            ("all-valid", "style_entropy_per_prompt", "all-valid bits/prompt", 1),
            (None, "kl_ref_theta", "KL(ref‖θ)", 1), (None, "kl_theta_ref", "KL(θ‖ref)", 1),
            (None, "keep@16", "keep@16", 100), (None, "explore@16", "explore@16", 100))
    arms = cmp.get("arms", {})
    lines = ["| arm | family | κ | routing | samples | start | " + " | ".join(c[2] for c in cols) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(cols)]
    for m in cmp["methods"]:
        if not cmp["results"].get(m):
            continue
        a = arms.get(m, dict(family="base", kappa="", routing="", samples="", start=""))
        cells = []
        for group, key, _, sc in cols:
            xs = [v for v in (_cat(cmp, m, s, group, key) for s in cmp["results"][m]) if v is not None]
            cells.append(mean_sd(xs, sc))
        lines.append(f"| {m} | {a['family']} | {a['kappa']} | {a['routing']} | {a['samples']} | {a['start']} | "
                     + " | ".join(cells) + " |")
    return lines + [""]


def _probe_table(cmp: dict) -> list:
    present = [p for p in PROBES if any(p in r for v in cmp["results"].values() for r in v.values())]
    if not present:
        return []
    cols = [(p, k) for p in present for k in ("pass@1", "pass@16", "greedy")]
    lines = ["| arm | " + " | ".join(f"{p} {k}" for p, k in cols) + " |", "|---|" + "---|" * len(cols)]
    for m in cmp["methods"]:
        if cmp["results"].get(m):
            lines.append(f"| {m} | " + " | ".join(mean_sd(values(cmp, m, p, k), 100) for p, k in cols) + " |")
    return lines + [""]


def _paired_table(cmp: dict, split: str, other: str) -> list:
    if not cmp["results"].get(other):
        return []
    cols = (("pass@1", "ΔPass@1", 100), ("pass@16", "ΔPass@16", 100), ("style_entropy", "Δentropy", 1),
            ("style_entropy_per_prompt", "Δper-prompt entropy", 1))
    lines = [f"Paired differences vs **{other}** on {split} (mean ± sd over seeds; seeds agreeing with the sign):", "",
             "| method | " + " | ".join(f"{h} | seeds" for _, h, _ in cols) + " |", "|---|" + "---|---|" * len(cols)]
    for m in cmp["methods"]:
        if m == other or not cmp["results"].get(m):
            continue
        cells = []
        for k, _, sc in cols:
            d = paired(cmp, m, other, split, k)
            cells += [mean_sd(d, sc, signed=True), agree(d)]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines + [""]


def format_table(cmp: dict, split: str = "test") -> str:
    """The short table printed at the end of `make run`."""
    head = f"{split}: mean ± sd over {len(cmp['seeds'])} seed(s)"
    rows = [f"{'method':>9s} | {'Pass@1':>12s} | {'Pass@16':>12s} | {'Greedy':>12s} | {'style bits':>12s} | "
            f"{'per prompt':>12s}"]
    for m in cmp["methods"]:
        if cmp["results"].get(m):
            v = [mean_sd(values(cmp, m, split, k), sc) for k, _, sc in METRICS]
            rows.append(f"{m:>9s} | " + " | ".join(f"{x:>12s}" for x in v))
    return head + "\n" + "\n".join(rows)


def write_report(cmp: dict, root: str) -> str:
    from .compare_claims import format_claims, plot_frontiers

    cfg = cmp["config"]
    plots = write_plots(cmp, root) + plot_frontiers(cmp, root)
    n_test = cfg["task"]["kwargs"].get("n_test", "?")
    lines = ["# dph-train compare: GRPO's diversity collapse and DPH-RL's cure on the styles task", "",
             f"Seeds {cmp['seeds']}; every method starts from the seed's SFT model; eval on {n_test} held-out prompts "
             f"per split, n={cfg['eval']['n']} samples per prompt (T={cfg['eval']['temperature']}, "
             f"top_p={cfg['eval']['top_p']}), unbiased Pass@k; greedy accuracy; style entropy of the split's samples "
             f"pooled and its mean per prompt (bits; 4 styles -> at most 2, more only with responses without a style "
             f"word). RL: {cfg['train']['steps']} "
             f"steps x {cfg['train']['prompts_per_step']} prompts x G={cfg['train']['group_size']}, "
             f"lr={cfg['train']['lr']} (arms may override steps / lr: compare.json `arms`). Strength "
             f"κ = η·f''(1) for a divergence, the KL coefficient for kl-k3 / rkl-k2. Wall {cmp['wall_s']:.0f} s.", "",
             f"Job version {cmp.get('job_version', 1)}: " + "; ".join(f"v{k}: {v}" for k, v in JOB_VERSIONS.items()
                                                                     if k <= cmp.get("job_version", 1)), ""]
    if "replication" in cmp:
        from .compare_real import format_replication

        lines += ["## Declared criteria of the real-model run (fixed in dph_train/compare_real.py before the run)",
                  ""] + format_replication(cmp["replication"])
    if cmp.get("reused_jobs"):
        lines += [f"Resumed: {len(cmp['reused_jobs'])} job(s) finished in an earlier invocation and were reused "
                  f"(compare.resume): {', '.join(cmp['reused_jobs'])}.", ""]
    if "claims" in cmp:
        lines += ["## Pre-registered verdicts (rules fixed in dph_train/compare_claims.py before the runs)", ""]
        lines += format_claims(cmp["claims"], len(cmp["seeds"])) + [""]
    lines += ["## Per category (test split)", "",
              "single = the single-style test prompts (one valid style, named by the last letter); all-valid = the "
              "prompts where every style is valid (base ≈ 2 bits per prompt); KL of the first-token style "
              "distribution against the SFT model (nats, mean over test prompts); keep@16 / explore@16: of the test "
              "prompts base solves (its per-prompt Pass@16 ≥ 0.5) / misses, the arm's mean Pass@16.", ""]
    lines += _category_table(cmp)
    lines += ["## Held-out SFT probes (forgetting; never in RL, presample or D_pef)", ""] + _probe_table(cmp)
    lines += ["## Results (pooled per split)", ""]
    for split in SPLITS:
        lines += _table(cmp, split)
    lines += ["## Paired differences", ""]
    for split in ("test", "ood-shift"):
        lines += _paired_table(cmp, split, "base") + _paired_table(cmp, split, "grpo")
    lines += ["## The headline, checked on this run", ""]
    for statement, holds, evidence in checks(cmp):
        lines.append(f"- **{'holds' if holds else 'does NOT hold'}** — {statement}. {evidence}")
    lines += ["", "## Figures", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
    lines += ["", "## What this toy shows, and what it does not", "",
              "- It shows the mechanism on a model small enough to train on a CPU in minutes: after SFT the policy "
              "samples four styles about equally; under GRPO the most-rewarded style (copy, valid on 70% of prompts) "
              "takes over before the prompt feature that names the valid style is learned, so the prompts that need "
              "another style are lost (Pass@16 falls). A mass-covering divergence to stored pi_ref samples on the "
              "prompts the base model always solves keeps the other styles alive, exploration on D_exp keeps finding "
              "them rewarded, and the cue gets learned.",
              "- It does not show the paper's numbers, models or tasks; the sizes (2-layer Llama, 17-token vocabulary, "
              "one-token style choice) are chosen so that the whole comparison runs in minutes. Which effect wins the "
              "race (collapse or learning the cue) depends on the learning rate and the number of steps: read the "
              "seeds, not only the means.",
              "- ood-remap re-maps the style-naming letters (a conflicting rule that cannot be inferred from the "
              "prompt): every method that learned the training rule is expected to lose there. ood-shift keeps the "
              "rules and reverses the shares of the single-style categories (the analogue of a new distribution of "
              "the same skill).",
              "- The KL baselines are named by their gradient: kl-k3 (the paper's \"RKL\" row, verl's low_var_kl) "
              "is a forward-KL gradient in expectation; rkl-k2 (on-policy) and dph-rkl (stored D_pef samples) are "
              "reverse-KL ones (experiments.md §1).",
              "- With one PPO epoch on on-policy samples the ratio is exactly 1, so clip bounds never bind: dapo "
              "(clip-higher) differs from grpo only where the config gives ppo_epochs > 1."
              if cfg["train"]["ppo_epochs"] == 1 else
              f"- ppo_epochs={cfg['train']['ppo_epochs']}: the later epochs are off-policy, so the clip bounds (dapo's "
              "clip-higher) act.",
              ""]
    if "replication" in cmp:  # the toy's reading (a 2-layer Llama and its sizes) does not describe a real model's run
        lines = lines[:lines.index("## What this toy shows, and what it does not")]
        lines += ["## What this run shows, and what it does not", "",
                  f"- A pretrained model ({cfg['compare']['sft']['base_model']}, its top "
                  f"{cfg['compare']['sft']['train_layers']} decoder layers SFT'd to answer in a uniformly random "
                  "style) "
                  "through the same pipeline as the toy; one seed, so every number is an indication and the "
                  "divergence choice is not judged here. The verdict above applies the criteria declared in "
                  "compare_real.py before the run, whichever way it falls.",
                  "- keep-rate: the probes the SFT model answered right greedily before any RL (seed_<s>/base/"
                  "probes_screened.json); an arm's greedy accuracy on them is the share it kept.", ""]
    path = os.path.join(root, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def write_plots(cmp: dict, root: str) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in cmp["methods"] if cmp["results"].get(m)]
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    paths = []

    splits = ("test", "ood-shift")
    fig, axes = plt.subplots(1, len(splits), figsize=(6 * len(splits), 4.2), squeeze=False)
    for ax, split in zip(axes[0], splits):
        for m in methods:
            runs = [cmp["results"][m][str(s)][split]["pass_at_k"] for s in cmp["seeds"] if str(s) in cmp["results"][m]]
            ks = sorted(int(k) for k in runs[0])
            mean = [statistics.mean(r[str(k)] for r in runs) for k in ks]
            sd = [statistics.stdev([r[str(k)] for r in runs]) if len(runs) > 1 else 0.0 for k in ks]
            ax.errorbar(ks, mean, yerr=sd, marker="o", capsize=3, label=m, color=colors[m],
                        linestyle="--" if m == "base" else "-")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k")
        ax.set_ylabel("Pass@k")
        ax.set_title(f"{split} (mean ± sd over {len(cmp['seeds'])} seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    paths.append(os.path.join(root, "passk.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    styles = sorted({st for m in methods for s in cmp["results"][m].values() for sp in splits
                     for st in s[sp]["style_counts"]})
    fig, axes = plt.subplots(1, len(splits), figsize=(6 * len(splits), 4.2), squeeze=False)
    for ax, split in zip(axes[0], splits):
        bottom = [0.0] * len(methods)
        for st in styles:
            frac = []
            for m in methods:
                tot = {k: 0 for k in styles}
                for s in cmp["results"][m].values():
                    for k, v in s[split]["style_counts"].items():
                        tot[k] += v
                frac.append(tot[st] / max(1, sum(tot.values())))
            ax.bar(methods, frac, bottom=bottom, label=st)
            bottom = [b + f for b, f in zip(bottom, frac)]
        ax.set_ylabel("share of samples")
        ax.set_title(f"style of the samples, {split} (all seeds)")
        ax.tick_params(axis="x", rotation=60, labelsize=6)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    paths.append(os.path.join(root, "styles.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for m in methods:
        if m == "base":
            continue
        curves = [read_jsonl(os.path.join(root, f"seed_{s}", m, "metrics.jsonl")) for s in cmp["seeds"]]
        curves = [[r["reward_mean"] for r in c if r.get("reward_mean") is not None] for c in curves if c]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        mean = [statistics.mean(c[i] for c in curves) for i in range(n)]
        w = max(1, n // 15)  # moving average: one step's reward is a few dozen groups
        smooth = [statistics.mean(mean[max(0, i - w + 1):i + 1]) for i in range(n)]
        ax.plot(range(1, n + 1), smooth, label=m, color=colors[m])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training reward (D_exp rollouts, moving mean)")
    ax.set_title("reward over training (mean over seeds); routing exp: rollouts on D_exp only")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    paths.append(os.path.join(root, "training.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths
