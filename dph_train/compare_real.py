"""The real-model run's verdict (issue 25: SmolLM2-135M on the styles task, one seed), from a compare.json dict alone.

Declared before the run; a change after seeing results is a new compare.job_version (compare_report.JOB_VERSIONS).

    Qualitative replication HOLDS iff, on every seed of the run:
      collapse - grpo's style entropy on the all-valid test prompts is < 0.5 bits (the mean over those prompts of
                 the entropy of one prompt's n samples, as compare_claims reads "all-valid entropy"), while its
                 Pass@1 on the single-style test prompts is above base's (the SFT model's);
      cure     - dph-f (its arm nearest kappa 0.05) keeps >= 1.5 bits there, with single-style Pass@1 >= grpo's.
    It does not hold otherwise, and is "untestable" when base, grpo or dph-f has no result.

    Keep-rate: an arm's greedy accuracy on the screened probes (the ones the SFT model answered right greedily; base
    is 100% by construction, up to sampling-engine noise). A difference between two arms under 5 points is called
    noise (~100 probes, of which fewer survive screening: a binomial sd of ~5 points at 80% and n = 60); above it is
    reported as a difference, still not a claim with one seed.

    Divergence choice: one seed supports no claim about it (dph-f against rkl-k2 or any other regulariser). Their
    numbers are shown; the question stays with the toy's multi-seed experiments (compare_claims.py).
"""
from __future__ import annotations

# ---- declared before the run ----
COLLAPSE_BELOW = 0.5  # grpo's all-valid entropy (bits per prompt) must fall below this
CURE_AT_LEAST = 1.5  # dph-f's all-valid entropy (bits per prompt) must stay at or above this
KEEP_NOISE = 0.05  # keep-rate differences below this (5 points) are noise
DPH_KAPPA = 0.05  # the dph-f arm of the verdict: the one nearest this kappa
PROBES = "probes"


from .compare_claims import _dig  # noqa: E402  (one nested-lookup helper for both verdict modules)


def _dph_arm(cmp: dict):
    arms = [(abs(float(m.get("kappa") or 0.0) - DPH_KAPPA), a) for a, m in cmp.get("arms", {}).items()
            if m.get("family") == "dph-f" and m.get("start", "sft") == "sft" and cmp["results"].get(a)]
    return min(arms)[1] if arms else None


def _seed_numbers(cmp: dict, arm: str, seed: str) -> dict:
    t = _dig(cmp, "results", arm, seed, "test")
    return dict(ent=_dig(t, "by_category", "all-valid", "style_entropy_per_prompt"),
                p1=_dig(t, "by_category", "single-style", "pass@1"),
                keep=_dig(cmp, "results", arm, seed, PROBES, "greedy"))


def replication(cmp: dict) -> dict:
    """{"verdict": holds | does not hold | untestable, "statement", "seeds": {seed: per-seed checks},
    "keep_rate": {arm: {seed: keep, "vs_grpo": {seed: diff}, "reading": noise | difference | n/a}}, "notes"}."""
    dph = _dph_arm(cmp)
    seeds = [str(s) for s in cmp["seeds"]]
    need = {"base": "base", "grpo": "grpo", "dph-f": dph}
    missing = [k for k, a in need.items() if a is None or not all(_dig(cmp, "results", a, s) for s in seeds)]
    out = dict(verdict="untestable", seeds={}, keep_rate={}, dph_arm=dph,
               notes=["one seed supports no claim about the divergence choice (dph-f vs rkl-k2 or others): "
                      "their numbers are shown, the question stays with the toy's multi-seed experiments"
                      if len(seeds) == 1 else
                      "the divergence choice is judged by the toy's multi-seed experiments, not by this run"])
    if missing:
        out["statement"] = f"no result for {missing} on every seed"
        return out
    holds = []
    for s in seeds:
        b, g, d = (_seed_numbers(cmp, need[k], s) for k in ("base", "grpo", "dph-f"))
        if None in (b["p1"], g["ent"], g["p1"], d["ent"], d["p1"]):
            out["seeds"][s] = dict(collapse=None, cure=None)
            holds.append(None)
            continue
        collapse = g["ent"] < COLLAPSE_BELOW and g["p1"] > b["p1"]
        cure = d["ent"] >= CURE_AT_LEAST and d["p1"] >= g["p1"]
        out["seeds"][s] = dict(collapse=collapse, cure=cure, base_p1=b["p1"], grpo_entropy=g["ent"],
                               grpo_p1=g["p1"], dph_entropy=d["ent"], dph_p1=d["p1"])
        holds.append(collapse and cure)
    if None in holds:
        out["statement"] = "the per-category numbers (test split, all-valid / single-style) are missing"
        return out
    out["verdict"] = "holds" if all(holds) else "does not hold"
    out["statement"] = (f"grpo's all-valid entropy < {COLLAPSE_BELOW} bits with single-style Pass@1 above base's, "
                        f"and {dph}'s >= {CURE_AT_LEAST} bits with Pass@1 >= grpo's, on every seed "
                        f"({sum(holds)}/{len(holds)})")
    for arm in cmp["methods"]:
        keep = {s: _seed_numbers(cmp, arm, s)["keep"] for s in seeds if _dig(cmp, "results", arm, s)}
        keep = {s: v for s, v in keep.items() if v is not None}
        if not keep:
            continue
        row = dict(keep)
        if arm != "grpo":
            grpo = {s: _seed_numbers(cmp, "grpo", s)["keep"] for s in keep}
            diff = {s: keep[s] - grpo[s] for s in keep if grpo[s] is not None}
            row["vs_grpo"] = diff
            row["reading"] = ("n/a" if not diff else "noise" if all(abs(v) < KEEP_NOISE for v in diff.values())
                              else "difference")
        out["keep_rate"][arm] = row
    return out


def format_replication(rep: dict) -> list:
    """Markdown lines for report.md."""
    lines = [f"**Qualitative replication: {rep['verdict']}** — {rep['statement']}.", ""]
    for s, c in rep["seeds"].items():
        if c.get("collapse") is None:
            continue
        lines.append(f"- seed {s}: collapse {'yes' if c['collapse'] else 'no'} (grpo all-valid "
                     f"{c['grpo_entropy']:.2f} bits/prompt, single-style Pass@1 {100 * c['grpo_p1']:.1f} vs base "
                     f"{100 * c['base_p1']:.1f}); cure {'yes' if c['cure'] else 'no'} ({rep['dph_arm']} "
                     f"{c['dph_entropy']:.2f} bits/prompt, Pass@1 {100 * c['dph_p1']:.1f} vs grpo "
                     f"{100 * c['grpo_p1']:.1f})")
    if rep["keep_rate"]:
        lines += ["", f"Keep-rate (greedy accuracy on the screened probes, %; differences under {100 * KEEP_NOISE:.0f} "
                      "points are noise):", "", "| arm | keep-rate | vs grpo | reading |", "|---|---|---|---|"]
        for arm, row in rep["keep_rate"].items():
            keep = ", ".join(f"{100 * v:.1f}" for k, v in row.items() if k not in ("vs_grpo", "reading"))
            vs = ", ".join(f"{100 * v:+.1f}" for v in row.get("vs_grpo", {}).values())
            lines.append(f"| {arm} | {keep} | {vs} | {row.get('reading', '')} |")
    lines += [""] + [f"- {n}" for n in rep["notes"]] + [""]
    return lines
