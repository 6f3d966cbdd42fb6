"""Verdicts on the paper's claims (experiments A-D of docs/experiments.md §5), from a compare.json dict alone.

Every rule below and every threshold at the top of this file is pre-registered: fixed before any run; a change is a
new job version (and the report lists it). The verdict of each experiment is "holds", "does not hold" or
"untestable"; where the toy cannot answer, the verdict says so instead of guessing.

Common terms
- Pass@1 / Pass@16 are the test split's "single-style" category; "all-valid entropy" is the test split's all-valid
  category style_entropy_per_prompt (bits).
- "Enough seeds" = ceil(0.8 x the number of seeds of the run) (4 of 5; 3 of 3).
- "F beats G" on paired per-seed differences d = F - G: d > 0 in at least enough seeds AND mean(d) > 2 SE, with
  SE = sd(d) / sqrt(n). One pair (n = 1) has no SE, so it never beats.
- A family's frontier for one seed: its start=sft arms' points ordered by kappa and joined piecewise-linearly. A
  value is read off it at a level of the other coordinate if some segment spans that level; when several segments
  do, the one with the smallest kappa is used.

A - choice vs strength. Levels: the seed's base Pass@1 + 0.10, + 0.20, + 0.30. At each level read Pass@16 off both
  frontiers of a pair (FKL side first): (dph-f, dph-rkl) and (kl-k3, rkl-k2). A level is testable for a pair if both
  frontiers reach it in the same seeds, at least enough of them. "F dominates G": F beats G at every testable level.
  Untestable if no pair has a testable level; holds if every testable pair has the FKL side dominating; does not hold
  otherwise. The alpha ladder (dph-f, dph-alpha, dph-js, dph-rkl: mean Pass@16 at each level) is evidence only.
B - forgetting. drop = base Pass@1 - arm Pass@1 on a probe split (t2a, t2b). A probe is testable only if grpo drops
  by >= 0.05 in at least enough seeds; with no testable probe: "forgetting is not testable in this toy". DPH forgets
  less if (grpo's drop - dph-f's drop) beats 0 on every testable probe (dph-f = its start=sft arm nearest kappa 0.05).
  Evidence also: a least-squares line of drop on realised KL(pi_ref||pi_theta) over all start=sft arms x seeds, and
  dph-f's mean residual from it (below zero: it forgets less than its distance predicts).
C - routing. Part 1: dph-f (kappa nearest 0.05) beats grpo-exp on Pass@16 AND on all-valid entropy. Part 2 (when
  fkl-all arms exist): per seed read fkl-all's Pass@1 off its frontier at dph-f's Pass@16; dph-f's Pass@1 minus that
  beats 0. Part 2 is testable if enough seeds have the matched point. Untestable if dph-f or grpo-exp is missing (or
  they share fewer than enough seeds); holds if part 1 holds and part 2 holds or is untested (fkl-all not run, or its
  frontier never reaches dph-f's Pass@16: said in the evidence); does not hold otherwise.
D - recovery. Recovery arms start from the seed's grpo checkpoint (start "grpo"); each family's arm nearest kappa 0.25
  is used. Untestable if there are none, if dph-f has none, or if grpo did not collapse (its mean all-valid entropy
  >= 1.0 bits: nothing to recover). Holds if dph-f's all-valid entropy >= 1.5 bits in at least enough seeds AND the
  means of dph-rkl and dph-js (those that were run) stay < 0.5 bits. Otherwise it does not hold, and the evidence says
  why: dph-f missed its threshold, a rival recovered as fast (mean >= dph-f's mean - 0.25 bits), or a mixed result
  (a rival between 0.5 bits and dph-f's mean - 0.25).
"""
from __future__ import annotations

import math
import os
import statistics

# ---- pre-registered: fixed before any run; a change is a new job version ----
ENOUGH_SHARE = 0.8  # "enough seeds" = ceil(ENOUGH_SHARE x seeds of the run)
SE_FACTOR = 2.0  # "beats": mean(d) > SE_FACTOR x SE
FULL_SEEDS = 5  # fewer seeds than this: every verdict is an indication
A_LEVELS = (0.10, 0.20, 0.30)  # Pass@1 levels above the seed's base Pass@1
A_PAIRS = (("dph-f", "dph-rkl"), ("kl-k3", "rkl-k2"))  # (FKL side, RKL side)
ALPHA_LADDER = ("dph-f", "dph-alpha", "dph-js", "dph-rkl")
B_PROBES = ("t2a", "t2b")
B_MIN_DROP = 0.05  # grpo must forget this much Pass@1 for forgetting to be testable
MATCH_KAPPA = 0.05  # the dph-f arm of experiments B and C
D_KAPPA = 0.25  # the recovery arms of experiment D
D_COLLAPSED_BELOW = 1.0  # grpo's mean all-valid entropy (bits) must be below this: something to recover
D_RECOVERED = 1.5  # dph-f's all-valid entropy (bits) in enough seeds
D_STAYS_BELOW = 0.5  # dph-rkl's and dph-js's mean all-valid entropy (bits)
D_AS_FAST_MARGIN = 0.25  # a rival within this many bits of dph-f's mean recovered as fast
KL_FLOOR = 1e-4  # log-axis floor of the KL frontier plot (base has KL 0)

TITLES = {"A": "A — choice vs strength", "B": "B — forgetting", "C": "C — routing", "D": "D — recovery"}


# ---- reading compare.json ----
def seeds_of(cmp: dict) -> list:
    return [str(s) for s in cmp["seeds"]]


def enough(n_seeds: int) -> int:
    """Seeds that must agree: ceil(0.8 n) (4 of 5, 3 of 3)."""
    return math.ceil(round(ENOUGH_SHARE * n_seeds, 9))


def _dig(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def value(cmp: dict, arm: str, seed: str, what: str):
    """One number of one arm and seed, or None if missing. what: p1 / p16 (test single-style), ent (test all-valid
    entropy per prompt), kl (test KL(pi_ref||pi_theta)), or "<probe>:pass@1" for a probe split."""
    r = _dig(cmp, "results", arm, seed)
    if what == "p1":
        return _dig(r, "test", "by_category", "single-style", "pass@1")
    if what == "p16":
        return _dig(r, "test", "by_category", "single-style", "pass@16")
    if what == "ent":
        return _dig(r, "test", "by_category", "all-valid", "style_entropy_per_prompt")
    if what == "kl":
        return _dig(r, "test", "kl_ref_theta")
    split, metric = what.split(":")
    return _dig(r, split, metric)


def arms_of(cmp: dict, family: str, start: str = "sft") -> list:
    """(kappa, arm) of a family's arms that have results, sorted by kappa."""
    return sorted((float(m.get("kappa") or 0.0), a) for a, m in cmp.get("arms", {}).items()
                  if m.get("family") == family and m.get("start", "sft") == start and cmp["results"].get(a))


def nearest_arm(cmp: dict, family: str, kappa: float, start: str = "sft"):
    """The family's arm with the smallest |kappa - target| (the smaller kappa on a tie), or None."""
    arms = arms_of(cmp, family, start)
    return min(arms, key=lambda ka: (abs(ka[0] - kappa), ka[0]))[1] if arms else None


def per_seed(cmp: dict, arm, what: str) -> dict:
    """{seed: value} over the run's seeds where the arm has the value."""
    out = {}
    for s in seeds_of(cmp):
        v = value(cmp, arm, s, what) if arm else None
        if v is not None:
            out[s] = v
    return out


# ---- the rules ----
def beats(d: list, n_seeds: int) -> dict:
    """"F beats G" on paired differences d = F - G: positive in >= enough seeds and mean > 2 SE."""
    n = len(d)
    mean = statistics.mean(d) if d else None
    se = statistics.stdev(d) / math.sqrt(n) if n > 1 else None
    n_pos = sum(1 for x in d if x > 0)
    ok = n > 1 and n_pos >= enough(n_seeds) and mean > SE_FACTOR * se
    return {"n": n, "mean": mean, "se": se, "n_positive": n_pos, "beats": bool(ok)}


def paired(a: dict, b: dict) -> list:
    """a - b over the seeds both have, in seed order of a."""
    return [a[s] - b[s] for s in a if s in b]


def frontier(cmp: dict, family: str, seed: str, x: str, y: str, start: str = "sft") -> list:
    """(x, y) points of a family's arms for one seed, in kappa order."""
    pts = []
    for _, arm in arms_of(cmp, family, start):
        xv, yv = value(cmp, arm, seed, x), value(cmp, arm, seed, y)
        if xv is not None and yv is not None:
            pts.append((xv, yv))
    return pts


def read_off(points: list, level: float):
    """y on the piecewise-linear frontier where x = level: the first (smallest kappa) segment spanning the level, or
    None if no segment does."""
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if min(x0, x1) <= level <= max(x0, x1):
            return y0 if x1 == x0 else y0 + (level - x0) / (x1 - x0) * (y1 - y0)
    return None


def _level_name(lv: float) -> str:
    return f"base+{lv:.2f}"


# ---- A: choice vs strength ----
def _p16_at_levels(cmp: dict, family: str) -> dict:
    """{level name: {seed: Pass@16 read off the family's frontier at base Pass@1 + level}}."""
    base = per_seed(cmp, "base", "p1")
    out = {}
    for lv in A_LEVELS:
        out[_level_name(lv)] = {}
        for s, b in base.items():
            y = read_off(frontier(cmp, family, s, "p1", "p16"), b + lv)
            if y is not None:
                out[_level_name(lv)][s] = y
    return out


def claim_a(cmp: dict) -> dict:
    n_seeds = len(seeds_of(cmp))
    pairs, verdicts = {}, []
    for f, g in A_PAIRS:
        vf, vg = _p16_at_levels(cmp, f), _p16_at_levels(cmp, g)
        levels = {}
        for name in vf:
            d = paired(vf[name], vg[name])
            fwd, rev = beats(d, n_seeds), beats([-x for x in d], n_seeds)
            levels[name] = {"testable": len(d) >= enough(n_seeds), "reached_fkl_side": len(vf[name]),
                            "reached_other": len(vg[name]), "n": fwd["n"], "mean_diff": fwd["mean"], "se": fwd["se"],
                            "n_positive": fwd["n_positive"], "fkl_beats": fwd["beats"], "reverse_beats": rev["beats"]}
        tested = [lv for lv in levels.values() if lv["testable"]]
        dom = bool(tested) and all(lv["fkl_beats"] for lv in tested)
        rev_dom = bool(tested) and all(lv["reverse_beats"] for lv in tested)
        pairs[f"{f} vs {g}"] = {"testable": bool(tested), "fkl_dominates": dom, "reverse_dominates": rev_dom,
                                "levels": levels}
        if tested:
            verdicts.append((f, g, dom, rev_dom))
    ladder = {}
    for fam in ALPHA_LADDER:
        if arms_of(cmp, fam):
            ladder[fam] = {name: {"mean_pass@16": statistics.mean(v.values()) if v else None, "n": len(v)}
                           for name, v in _p16_at_levels(cmp, fam).items()}
    evidence = {"enough_seeds": enough(n_seeds), "pairs": pairs, "alpha_ladder": ladder}
    if not verdicts:
        return {"verdict": "untestable", "evidence": evidence,
                "statement": "no matched pair reaches a common Pass@1 level (base +10/+20/+30 points) in enough seeds"}
    if all(dom for _, _, dom, _ in verdicts):
        return {"verdict": "holds", "evidence": evidence, "statement": "the forward-KL side dominates at matched "
                "single-style Pass@1 in every testable pair: " + ", ".join(f"{f} over {g}" for f, g, _, _ in verdicts)}
    parts = [f"{g} dominates {f}" if rev else f"{f} over {g}: {'dominates' if dom else 'no dominance'}"
             for f, g, dom, rev in verdicts]
    return {"verdict": "does not hold", "evidence": evidence,
            "statement": "the forward-KL side does not dominate in every testable pair (" + "; ".join(parts) + ")"}


# ---- B: forgetting ----
def drops(cmp: dict, arm, probe: str) -> dict:
    """{seed: base Pass@1 - arm Pass@1} on a probe split."""
    base, a = per_seed(cmp, "base", f"{probe}:pass@1"), per_seed(cmp, arm, f"{probe}:pass@1")
    return {s: base[s] - a[s] for s in a if s in base}


def fit_line(xs: list, ys: list):
    """Least-squares (slope, intercept), or None with fewer than two distinct x."""
    if len(xs) < 2 or len(set(xs)) < 2:
        return None
    mx, my = statistics.mean(xs), statistics.mean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return slope, my - slope * mx


def claim_b(cmp: dict) -> dict:
    n_seeds = len(seeds_of(cmp))
    dph = nearest_arm(cmp, "dph-f", MATCH_KAPPA)
    probes, tested = {}, []
    for probe in B_PROBES:
        g = drops(cmp, nearest_arm(cmp, "grpo", 0.0), probe)
        n_forget = sum(1 for v in g.values() if v >= B_MIN_DROP)
        ev = {"testable": n_forget >= enough(n_seeds), "grpo_drop_mean": statistics.mean(g.values()) if g else None,
              "grpo_seeds_dropping": n_forget, "grpo_drops": g}
        xs, ys, dph_pts = [], [], []
        for arm in sorted(a for a, m in cmp.get("arms", {}).items() if m.get("start", "sft") == "sft"):
            kl, dr = per_seed(cmp, arm, "kl"), drops(cmp, arm, probe)
            for s in dr:
                if s in kl:
                    xs.append(kl[s])
                    ys.append(dr[s])
                    if arm == dph:
                        dph_pts.append((kl[s], dr[s]))
        line = fit_line(xs, ys)
        ev["fit"] = ({"slope": line[0], "intercept": line[1], "n_points": len(xs)} if line
                     else {"slope": None, "intercept": None, "n_points": len(xs)})
        ev["dph_f_mean_residual"] = (statistics.mean(y - (line[1] + line[0] * x) for x, y in dph_pts)
                                     if line and dph_pts else None)
        if ev["testable"] and dph:
            ev["grpo_minus_dph_f"] = beats(paired(g, drops(cmp, dph, probe)), n_seeds)
            tested.append((probe, ev["grpo_minus_dph_f"]["beats"]))
        probes[probe] = ev
    evidence = {"enough_seeds": enough(n_seeds), "dph_f_arm": dph, "probes": probes}
    if not any(p["testable"] for p in probes.values()):
        evidence["note"] = "forgetting is not testable in this toy"
        return {"verdict": "untestable", "evidence": evidence, "statement": "forgetting is not testable in this toy: "
                f"grpo's probe Pass@1 does not drop >= {100 * B_MIN_DROP:.0f} points in enough seeds"}
    if not dph:
        return {"verdict": "untestable", "evidence": evidence, "statement": "grpo forgets, but dph-f was not run"}
    names = ", ".join(p for p, _ in tested)
    if all(ok for _, ok in tested):
        return {"verdict": "holds", "evidence": evidence,
                "statement": f"dph-f ({dph}) forgets less than grpo on {names}"}
    return {"verdict": "does not hold", "evidence": evidence, "statement": f"dph-f ({dph}) does not forget "
            f"measurably less than grpo on every testable probe ({names})"}


# ---- C: routing ----
def claim_c(cmp: dict) -> dict:
    n_seeds = len(seeds_of(cmp))
    dph, exp = nearest_arm(cmp, "dph-f", MATCH_KAPPA), nearest_arm(cmp, "grpo-exp", 0.0)
    evidence = {"enough_seeds": enough(n_seeds), "dph_f_arm": dph, "grpo_exp_arm": exp}
    if not dph or not exp:
        return {"verdict": "untestable", "evidence": evidence,
                "statement": "needs both dph-f and grpo-exp: " + ", ".join(
                    n for n, a in (("dph-f", dph), ("grpo-exp", exp)) if not a) + " not run"}
    p16 = beats(paired(per_seed(cmp, dph, "p16"), per_seed(cmp, exp, "p16")), n_seeds)
    ent = beats(paired(per_seed(cmp, dph, "ent"), per_seed(cmp, exp, "ent")), n_seeds)
    evidence.update({"pass@16_vs_grpo_exp": p16, "entropy_vs_grpo_exp": ent})
    if min(p16["n"], ent["n"]) < enough(n_seeds):
        return {"verdict": "untestable", "evidence": evidence,
                "statement": "dph-f and grpo-exp share fewer than enough seeds"}
    part1 = p16["beats"] and ent["beats"]
    part2 = None  # None: untested
    if arms_of(cmp, "fkl-all"):
        dph_p1, dph_p16 = per_seed(cmp, dph, "p1"), per_seed(cmp, dph, "p16")
        matched = {}
        for s in dph_p16:
            y = read_off(frontier(cmp, "fkl-all", s, "p16", "p1"), dph_p16[s])
            if y is not None and s in dph_p1:
                matched[s] = y
        evidence["fkl_all_pass@1_at_matched_pass@16"] = matched
        if len(matched) >= enough(n_seeds):
            evidence["pass@1_vs_fkl_all"] = beats(paired(dph_p1, matched), n_seeds)
            part2 = evidence["pass@1_vs_fkl_all"]["beats"]
        else:
            evidence["note"] = ("fkl-all's frontier does not reach dph-f's Pass@16 in enough seeds: the "
                                "routing-vs-estimator half is untested")
    else:
        evidence["note"] = "fkl-all not run: the routing-vs-estimator half is untested"
    evidence.update({"part1": part1, "part2": part2})
    if part1 and part2 is not False:
        rest = "and beats fkl-all on Pass@1 at matched Pass@16" if part2 else "(fkl-all half untested)"
        return {"verdict": "holds", "evidence": evidence,
                "statement": f"dph-f beats grpo-exp on single-style Pass@16 and all-valid entropy {rest}"}
    why = [] if part1 else ["dph-f does not beat grpo-exp on " + " and ".join(
        n for n, r in (("Pass@16", p16), ("all-valid entropy", ent)) if not r["beats"])]
    if part2 is False:
        why.append("fkl-all's Pass@1 at matched Pass@16 is not below dph-f's")
    return {"verdict": "does not hold", "evidence": evidence, "statement": "; ".join(why)}


# ---- D: recovery ----
def _summary(vals: dict) -> dict:
    xs = list(vals.values())
    return {"mean": statistics.mean(xs) if xs else None, "sd": statistics.stdev(xs) if len(xs) > 1 else None,
            "per_seed": vals}


def claim_d(cmp: dict) -> dict:
    n_seeds = len(seeds_of(cmp))
    rec = [a for a, m in cmp.get("arms", {}).items() if m.get("start") == "grpo" and cmp["results"].get(a)]
    grpo_ent = per_seed(cmp, nearest_arm(cmp, "grpo", 0.0), "ent")
    evidence = {"enough_seeds": enough(n_seeds), "recovery_arms": sorted(rec), "grpo": _summary(grpo_ent)}
    if not rec:
        return {"verdict": "untestable", "evidence": evidence, "statement": "no recovery arms (start: grpo) were run"}
    if not grpo_ent or statistics.mean(grpo_ent.values()) >= D_COLLAPSED_BELOW:
        return {"verdict": "untestable", "evidence": evidence, "statement": "grpo did not collapse (mean all-valid "
                f"entropy not below {D_COLLAPSED_BELOW} bits): nothing to recover"}
    fams = {}
    for fam in ("dph-f", "dph-rkl", "dph-js", "kl-k3", "rkl-k2"):
        arm = nearest_arm(cmp, fam, D_KAPPA, start="grpo")
        if arm:
            fams[fam] = dict(_summary(per_seed(cmp, arm, "ent")), arm=arm)
    evidence["families"] = fams
    rivals = [f for f in ("dph-rkl", "dph-js") if f in fams]
    evidence["missing"] = [f for f in ("dph-f", "dph-rkl", "dph-js") if f not in fams]
    if "dph-f" not in fams or fams["dph-f"]["mean"] is None:
        return {"verdict": "untestable", "evidence": evidence, "statement": "no dph-f recovery arm"}
    f = fams["dph-f"]
    n_ok = sum(1 for v in f["per_seed"].values() if v >= D_RECOVERED)
    f_ok = n_ok >= enough(n_seeds)
    evidence["dph_f_seeds_recovered"] = n_ok
    low = [r for r in rivals if fams[r]["mean"] < D_STAYS_BELOW]
    fast = [r for r in rivals if fams[r]["mean"] >= f["mean"] - D_AS_FAST_MARGIN]
    missing = f" ({', '.join(evidence['missing'])} not run)" if evidence["missing"] else ""
    if f_ok and len(low) == len(rivals):
        return {"verdict": "holds", "evidence": evidence, "statement": f"dph-f recovers >= {D_RECOVERED} bits of "
                f"all-valid entropy in {n_ok}/{len(f['per_seed'])} seeds; " + (", ".join(rivals) or "no rival") +
                f" stay below {D_STAYS_BELOW} bits" + missing}
    why = [] if f_ok else [f"dph-f reaches {D_RECOVERED} bits in only {n_ok} seeds (needs {enough(n_seeds)})"]
    if fast:
        why.append(", ".join(fast) + " recover as fast as dph-f")
    mixed = [r for r in rivals if r not in low and r not in fast]
    if mixed:
        why.append("mixed: " + ", ".join(mixed) + f" end between {D_STAYS_BELOW} bits and dph-f's mean - "
                   f"{D_AS_FAST_MARGIN}")
    return {"verdict": "does not hold", "evidence": evidence, "statement": "; ".join(why) + missing}


def claims(cmp: dict) -> dict:
    """The four verdicts: {"A" | "B" | "C" | "D": {"verdict", "statement", "evidence"}} (json-serialisable)."""
    return {"A": claim_a(cmp), "B": claim_b(cmp), "C": claim_c(cmp), "D": claim_d(cmp)}


# ---- report lines ----
def _pts(x, signed: bool = True) -> str:
    return "n/a" if x is None else (f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}")


def _diff(b: dict, bits: bool = False) -> str:
    """A "beats" result as: mean ± SE in points (or bits) (positive/n)."""
    if b["mean"] is None:
        return "n/a"
    scale, fmt, unit = (1, ".2f", "bits") if bits else (100, ".1f", "pts")
    se = "" if b["se"] is None else f" ± {scale * b['se']:{fmt}}"
    return f"{scale * b['mean']:+{fmt}}{se} {unit} ({b['n_positive']}/{b['n']} up)"


def _bits(s: dict) -> str:
    if s.get("mean") is None:
        return "n/a"
    return f"{s['mean']:.2f}" + ("" if s.get("sd") is None else f" ± {s['sd']:.2f}") + " bits"


def _evidence_line(key: str, ev: dict) -> str:
    if key == "A":
        parts = []
        for name, p in ev["pairs"].items():
            lv = [f"{ln}: " + (_diff({"mean": v["mean_diff"], "se": v["se"], "n_positive": v["n_positive"],
                                      "n": v["n"]}) if v["testable"] else f"not reached ({v['n']} seeds)")
                  for ln, v in p["levels"].items()]
            parts.append(f"{name} Pass@16 diff " + ", ".join(lv))
        return "; ".join(parts)
    if key == "B":
        parts = []
        for probe, p in ev["probes"].items():
            s = f"{probe}: grpo drop {_pts(p['grpo_drop_mean'], False)} pts ({p['grpo_seeds_dropping']} seeds ≥ " \
                f"{100 * B_MIN_DROP:.0f})"
            if "grpo_minus_dph_f" in p:
                s += f", grpo − dph-f drop {_diff(p['grpo_minus_dph_f'])}"
            if p["fit"]["slope"] is not None:
                s += f", fit drop = {p['fit']['intercept']:.3f} + {p['fit']['slope']:.3f}·KL"
            if p["dph_f_mean_residual"] is not None:
                s += f", dph-f residual {_pts(p['dph_f_mean_residual'])} pts"
            parts.append(s)
        return "; ".join(parts)
    if key == "C":
        if "pass@16_vs_grpo_exp" not in ev:
            return "n/a"
        s = (f"dph-f − grpo-exp: Pass@16 {_diff(ev['pass@16_vs_grpo_exp'])}, all-valid entropy "
             f"{_diff(ev['entropy_vs_grpo_exp'], bits=True)}")
        if "pass@1_vs_fkl_all" in ev:
            s += f"; dph-f − fkl-all Pass@1 at matched Pass@16 {_diff(ev['pass@1_vs_fkl_all'])}"
        return s + (f"; {ev['note']}" if "note" in ev else "")
    parts = [f"grpo {_bits(ev['grpo'])}"]
    parts += [f"{fam} {_bits(s)}" for fam, s in ev.get("families", {}).items()]
    return "all-valid entropy: " + ", ".join(parts)


def format_claims(result: dict, n_seeds: int) -> list:
    """Markdown bullets for report.md: one per experiment, verdict in bold, statement, compact evidence."""
    mark = f" (indication: {n_seeds} seeds)" if n_seeds < FULL_SEEDS else ""
    return [f"- {TITLES[k]}: **{c['verdict']}**{mark}. {c['statement']}. Evidence: {_evidence_line(k, c['evidence'])}"
            for k, c in result.items()]


# ---- plots ----
def plot_frontiers(cmp: dict, root: str) -> list:
    """frontier.png (single-style Pass@16 vs Pass@1) and frontier_kl.png (Pass@16 vs realised KL(pi_ref||pi_theta),
    log x): each family's per-kappa mean joined along kappa, per-seed points faint; grpo, grpo-exp and base as single
    markers. Only start=sft arms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    singles = ("base", "grpo", "grpo-exp")
    fams = sorted({m.get("family") for m in cmp.get("arms", {}).values() if m.get("start", "sft") == "sft"}
                  - set(singles) - {None})
    colors = {f: plt.cm.tab10(i % 10) for i, f in enumerate(fams)}
    markers = {"base": ("k", "s"), "grpo": ("r", "X"), "grpo-exp": ("m", "P")}
    paths = []
    for fname, xkey, xlabel in (("frontier.png", "p1", "single-style Pass@1"),
                                ("frontier_kl.png", "kl", "realised KL(π_ref‖π_θ) (nats)")):
        def xval(arm, s, xkey=xkey):
            v = value(cmp, arm, s, xkey)
            return v if v is None or xkey != "kl" else max(v, KL_FLOOR)

        fig, ax = plt.subplots(figsize=(7, 5))
        for fam in fams:
            mean_pts = []
            for _, arm in arms_of(cmp, fam):
                pts = [(xval(arm, s), value(cmp, arm, s, "p16")) for s in seeds_of(cmp)]
                pts = [(x, y) for x, y in pts if x is not None and y is not None]
                if pts:
                    ax.scatter(*zip(*pts), color=colors[fam], alpha=0.2, s=14)
                    mean_pts.append((statistics.mean(p[0] for p in pts), statistics.mean(p[1] for p in pts)))
            if mean_pts:
                ax.plot(*zip(*mean_pts), marker="o", color=colors[fam], label=fam)
        for name in singles:
            arm = name if name == "base" else nearest_arm(cmp, name, 0.0)
            pts = [(xval(arm, s), value(cmp, arm, s, "p16")) for s in seeds_of(cmp)] if arm else []
            pts = [(x, y) for x, y in pts if x is not None and y is not None]
            if pts:
                c, mk = markers[name]
                ax.scatter([statistics.mean(p[0] for p in pts)], [statistics.mean(p[1] for p in pts)], color=c,
                           marker=mk, s=80, label=name, zorder=3)
        if xkey == "kl":
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("single-style Pass@16")
        ax.set_title(f"{fname[:-4]}: family means joined along κ ({len(cmp['seeds'])} seeds, faint: per seed)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(os.path.join(root, fname))
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths
