"""The pre-registered verdicts of experiments A-D (dph_train/compare_claims.py) on hand-made compare.json dicts."""
import json
import os

import pytest

from dph_train import compare_claims as cc

BASE = dict(p1=0.30, p16=0.90, ent=2.0, kl=0.0, t2a=0.80, t2b=0.80)


def _per_seed(v, i):
    return v[i] if isinstance(v, (list, tuple)) else v


def make(n_seeds=5):
    cmp = {"seeds": list(range(n_seeds)), "job_version": 1, "arms": {}, "results": {}}
    add(cmp, "base", None, None, **BASE)
    return cmp


def add(cmp, arm, family, kappa, start="sft", seeds=None, **kw):
    """One arm; each metric (p1, p16, ent, kl, t2a, t2b) is a number or a list over the run's seeds."""
    if arm != "base":
        cmp["arms"][arm] = {"family": family, "kappa": kappa, "routing": "exp", "samples": "pef",
                            "estimator": None, "start": start}
    m = dict(BASE, **kw)
    out = cmp["results"].setdefault(arm, {})
    for i, s in enumerate(cmp["seeds"]):
        if seeds is not None and s not in seeds:
            continue
        v = {k: _per_seed(x, i) for k, x in m.items()}
        cat = {"pass@1": v["p1"], "pass@16": v["p16"], "style_entropy": v["ent"],
               "style_entropy_per_prompt": v["ent"]}
        probe = lambda p: {"pass@1": p, "pass@16": min(1.0, p + 0.1), "greedy": p}  # noqa: E731
        out[str(s)] = {"test": dict(cat, by_category={"all-valid": dict(cat), "single-style": dict(cat)},
                                    kl_ref_theta=v["kl"], kl_theta_ref=v["kl"], **{"keep@16": 0.9, "explore@16": 0.1}),
                       "t2a": probe(v["t2a"]), "t2b": probe(v["t2b"]), "ood-remap": probe(0.2),
                       "ood-shift": probe(0.5)}
    return cmp


def frontier_family(cmp, family, pts, start="sft", **kw):
    """Arms of one family at kappa 0.01, 0.1, 1.0 with the given (Pass@1, Pass@16) points."""
    for kappa, (p1, p16) in zip((0.01, 0.1, 1.0), pts):
        add(cmp, f"{family}-k{kappa}", family, kappa, start=start, p1=p1, p16=p16, kl=kappa, **kw)


HIGH = [(0.70, 0.70), (0.50, 0.85), (0.35, 0.90)]  # frontier of the forward-KL side
LOW = [(0.70, 0.50), (0.50, 0.60), (0.35, 0.80)]  # a lower frontier
JITTER = [0.0, 0.01, -0.01, 0.02, -0.02]


def with_jitter(pts, n=5):
    return [(p1, [p16 + JITTER[i % 5] for i in range(n)]) for p1, p16 in pts]


def a_cmp(fkl=HIGH, rkl=LOW, n_seeds=5):
    cmp = make(n_seeds)
    frontier_family(cmp, "dph-f", with_jitter(fkl, n_seeds))
    frontier_family(cmp, "dph-rkl", rkl)
    frontier_family(cmp, "kl-k3", fkl)
    frontier_family(cmp, "rkl-k2", rkl)
    return cmp


# ---- common rules ----
def test_enough_seeds_and_beats():
    assert [cc.enough(n) for n in (1, 3, 4, 5, 10)] == [1, 3, 4, 4, 8]
    assert cc.beats([0.1, 0.1, 0.1, 0.1, -0.01], 5)["beats"]  # 4/5 positive, mean well above 2 SE
    assert not cc.beats([0.1, 0.1, 0.1, -0.01, -0.01], 5)["beats"]  # 3/5 positive
    assert not cc.beats([0.1, 0.12, -0.01], 3)["beats"]  # 3 seeds: 3/3 positive needed
    assert cc.beats([0.1, 0.12, 0.11], 3)["beats"]
    assert not cc.beats([0.3], 1)["beats"]  # n = 1: no SE, never beats
    assert not cc.beats([0.01, 0.5, 0.01, 0.5, 0.01], 5)["beats"]  # all positive but mean < 2 SE
    assert not cc.beats([], 5)["beats"]


def test_read_off_uses_the_smallest_kappa_segment():
    pts = [(0.2, 0.9), (0.6, 0.7), (0.4, 0.5)]  # folds back: x = 0.5 is spanned by both segments
    assert cc.read_off(pts, 0.4) == pytest.approx(0.8)
    assert cc.read_off(pts, 0.5) == pytest.approx(0.75)
    assert cc.read_off(pts, 0.7) is None and cc.read_off(pts[:1], 0.2) is None


# ---- A ----
def test_a_holds_when_fkl_dominates_both_pairs():
    c = cc.claims(a_cmp())["A"]
    assert c["verdict"] == "holds"
    lv = c["evidence"]["pairs"]["dph-f vs dph-rkl"]["levels"]["base+0.20"]  # Pass@1 0.5: 0.85 vs 0.60
    assert lv["testable"] and lv["n"] == 5 and lv["mean_diff"] == pytest.approx(0.25) and lv["fkl_beats"]
    ladder = c["evidence"]["alpha_ladder"]
    assert set(ladder) == {"dph-f", "dph-rkl"} and ladder["dph-rkl"]["base+0.20"]["mean_pass@16"] == pytest.approx(0.6)


def test_a_does_not_hold_when_rkl_dominates():
    c = cc.claims(a_cmp(fkl=LOW, rkl=HIGH))["A"]
    assert c["verdict"] == "does not hold"
    assert all(p["reverse_dominates"] and not p["fkl_dominates"] for p in c["evidence"]["pairs"].values())
    assert "dph-rkl dominates dph-f" in c["statement"]


def test_a_does_not_hold_on_overlapping_frontiers():
    c = cc.claims(a_cmp(fkl=HIGH, rkl=HIGH))["A"]
    assert c["verdict"] == "does not hold"
    assert not any(p["fkl_dominates"] or p["reverse_dominates"] for p in c["evidence"]["pairs"].values())


def test_a_untestable_when_no_level_is_reached():
    flat = [(0.31, 0.9), (0.33, 0.9), (0.36, 0.9)]  # never 10 points above base Pass@1
    c = cc.claims(a_cmp(fkl=flat, rkl=flat))["A"]
    assert c["verdict"] == "untestable"
    cmp = make()  # one kappa per family: no segment
    add(cmp, "dph-f-k0.05", "dph-f", 0.05, p1=0.5)
    add(cmp, "dph-rkl-k0.05", "dph-rkl", 0.05, p1=0.5)
    assert cc.claims(cmp)["A"]["verdict"] == "untestable"


def test_a_three_seeds_need_all_three():
    assert cc.claims(a_cmp(n_seeds=3))["A"]["verdict"] == "holds"
    # one seed of three where dph-f is below dph-rkl: 2/3 positive is not enough (it would be 4/5 with 5 seeds)
    for n_seeds, verdict in ((3, "does not hold"), (5, "holds")):
        cmp = a_cmp(n_seeds=n_seeds)
        for kappa, (p1, p16) in zip((0.01, 0.1, 1.0), LOW):  # seed 1: dph-f 1 point below dph-rkl
            cmp["results"][f"dph-f-k{kappa}"]["1"]["test"]["by_category"]["single-style"]["pass@16"] = p16 - 0.01
        c = cc.claims(cmp)["A"]
        assert c["evidence"]["enough_seeds"] == (3 if n_seeds == 3 else 4)
        pair = c["evidence"]["pairs"]["dph-f vs dph-rkl"]
        assert pair["fkl_dominates"] == (verdict == "holds"), pair
        assert c["verdict"] == verdict


def test_a_missing_seeds_make_a_level_untestable():
    cmp = a_cmp()
    for kappa in (0.01, 0.1, 1.0):  # dph-rkl ran on 3 of 5 seeds only: pair 1 untestable, pair 2 decides
        for s in ("3", "4"):
            del cmp["results"][f"dph-rkl-k{kappa}"][s]
    c = cc.claims(cmp)["A"]
    assert not c["evidence"]["pairs"]["dph-f vs dph-rkl"]["testable"]
    assert c["verdict"] == "holds" and "kl-k3 over rkl-k2" in c["statement"] and "dph-rkl" not in c["statement"]


# ---- B ----
def b_cmp(grpo_t2a=0.60, dph_t2a=(0.76, 0.75, 0.77, 0.74, 0.76), grpo_t2b=0.79):
    cmp = make()
    add(cmp, "grpo", "grpo", 0.0, kl=0.8, t2a=grpo_t2a, t2b=grpo_t2b)
    add(cmp, "dph-f-k0.05", "dph-f", 0.05, kl=0.1, t2a=list(dph_t2a))
    add(cmp, "dph-f-k0.5", "dph-f", 0.5, kl=0.02, t2a=0.79)
    add(cmp, "kl-k3-k0.05", "kl-k3", 0.05, kl=0.3, t2a=0.70)
    add(cmp, "rec-dph-f-k0.25", "dph-f", 0.25, start="grpo", kl=0.5, t2a=0.0)  # not on the regression
    return cmp


def test_b_holds_when_dph_forgets_less():
    c = cc.claims(b_cmp())["B"]
    assert c["verdict"] == "holds", c
    ev = c["evidence"]
    assert ev["dph_f_arm"] == "dph-f-k0.05"
    assert ev["probes"]["t2a"]["testable"] and not ev["probes"]["t2b"]["testable"]  # t2b: grpo drops 1 point
    assert ev["probes"]["t2a"]["grpo_minus_dph_f"]["mean"] == pytest.approx(0.20 - 0.044)
    fit = ev["probes"]["t2a"]["fit"]
    assert fit["n_points"] == 20 and fit["slope"] > 0  # 4 sft arms x 5 seeds; the recovery arm is left out


def test_b_does_not_hold_when_dph_forgets_as_much():
    c = cc.claims(b_cmp(dph_t2a=(0.60, 0.62, 0.58, 0.61, 0.59)))["B"]
    assert c["verdict"] == "does not hold"


def test_b_untestable_when_grpo_does_not_forget():
    c = cc.claims(b_cmp(grpo_t2a=[0.78, 0.70, 0.79, 0.79, 0.70]))["B"]  # drops >= 5 points in 2/5 seeds only
    assert c["verdict"] == "untestable"
    assert "forgetting is not testable in this toy" in c["statement"]
    assert c["evidence"]["note"] == "forgetting is not testable in this toy"


# ---- C ----
def c_cmp(dph=dict(p1=0.55, p16=0.85, ent=1.8), exp=dict(p1=0.6, p16=0.5, ent=0.3), fkl_all=None):
    cmp = make()
    add(cmp, "grpo", "grpo", 0.0, p1=0.7, p16=0.4, ent=0.1)
    add(cmp, "grpo-exp", "grpo-exp", 0.0, **{k: [v + j for j in JITTER] for k, v in exp.items()})
    add(cmp, "dph-f-k0.05", "dph-f", 0.05, **dph)
    add(cmp, "dph-f-k0.5", "dph-f", 0.5, p1=0.4, p16=0.9, ent=1.9)
    for kappa, (p1, p16) in zip((0.05, 0.5), fkl_all or ()):
        add(cmp, f"fkl-all-k{kappa}", "fkl-all", kappa, p1=p1, p16=p16)
    return cmp


def test_c_holds_without_fkl_all_and_says_half_untested():
    c = cc.claims(c_cmp())["C"]
    assert c["verdict"] == "holds" and c["evidence"]["part2"] is None
    assert c["evidence"]["note"] == "fkl-all not run: the routing-vs-estimator half is untested"


def test_c_holds_with_fkl_all_behind():
    c = cc.claims(c_cmp(fkl_all=[(0.60, 0.60), (0.35, 0.90)]))["C"]  # at Pass@16 0.85: Pass@1 0.392 < 0.55
    assert c["verdict"] == "holds" and c["evidence"]["part2"] is True
    assert c["evidence"]["fkl_all_pass@1_at_matched_pass@16"]["0"] == pytest.approx(0.6 - 0.25 * 0.25 / 0.3)


def test_c_does_not_hold_when_fkl_all_matches_or_grpo_exp_ties():
    c = cc.claims(c_cmp(fkl_all=[(0.70, 0.70), (0.55, 0.95)]))["C"]  # matched Pass@1 0.625 >= 0.55
    assert c["verdict"] == "does not hold" and "fkl-all" in c["statement"]
    c = cc.claims(c_cmp(exp=dict(p1=0.55, p16=0.85, ent=1.8)))["C"]  # grpo-exp ~ dph-f
    assert c["verdict"] == "does not hold" and "Pass@16 and all-valid entropy" in c["statement"]


def test_c_untestable_without_grpo_exp():
    cmp = c_cmp()
    del cmp["arms"]["grpo-exp"], cmp["results"]["grpo-exp"]
    c = cc.claims(cmp)["C"]
    assert c["verdict"] == "untestable" and "grpo-exp not run" in c["statement"]


# ---- D ----
def d_cmp(f=1.8, rkl=0.2, js=0.3, grpo=0.1, recovery=True):
    cmp = make()
    add(cmp, "grpo", "grpo", 0.0, ent=grpo)
    add(cmp, "dph-f-k0.05", "dph-f", 0.05, ent=1.9)  # an sft arm: not a recovery arm
    if recovery:
        for fam, ent in (("dph-f", f), ("dph-rkl", rkl), ("dph-js", js), ("kl-k3", 1.0)):
            if ent is not None:
                add(cmp, f"rec-{fam}-k0.25", fam, 0.25, start="grpo", ent=ent)
        add(cmp, "rec-dph-f-k1.0", "dph-f", 1.0, start="grpo", ent=0.0)  # farther from 0.25: not used
    return cmp


def test_d_holds_when_only_fkl_recovers():
    c = cc.claims(d_cmp(f=[1.8, 1.7, 1.9, 1.4, 1.6]))["D"]  # 4/5 seeds >= 1.5 bits
    assert c["verdict"] == "holds", c
    fams = c["evidence"]["families"]
    assert fams["dph-f"]["arm"] == "rec-dph-f-k0.25" and fams["dph-f"]["mean"] == pytest.approx(1.68)
    assert fams["kl-k3"]["mean"] == pytest.approx(1.0) and c["evidence"]["missing"] == []


def test_d_does_not_hold_when_rkl_recovers_as_fast_or_mixed():
    c = cc.claims(d_cmp(rkl=1.7))["D"]
    assert c["verdict"] == "does not hold" and "dph-rkl recover as fast" in c["statement"]
    c = cc.claims(d_cmp(js=1.0))["D"]
    assert c["verdict"] == "does not hold" and "mixed: dph-js" in c["statement"]
    c = cc.claims(d_cmp(f=[1.8, 1.2, 1.9, 1.4, 1.6]))["D"]  # 3/5 seeds >= 1.5
    assert c["verdict"] == "does not hold" and "only 3 seeds" in c["statement"]


def test_d_untestable_without_collapse_or_recovery_arms():
    assert cc.claims(d_cmp(grpo=1.2))["D"]["verdict"] == "untestable"
    assert "nothing to recover" in cc.claims(d_cmp(grpo=1.2))["D"]["statement"]
    assert cc.claims(d_cmp(recovery=False))["D"]["verdict"] == "untestable"


def test_d_names_missing_rivals():
    c = cc.claims(d_cmp(rkl=None, js=None))["D"]
    assert c["verdict"] == "holds" and c["evidence"]["missing"] == ["dph-rkl", "dph-js"]
    assert "dph-rkl, dph-js not run" in c["statement"]


# ---- whole output ----
def test_small_run_with_missing_arms_is_json_and_untestable():
    cmp = make(3)
    add(cmp, "grpo", "grpo", 0.0, p1=0.7, p16=0.4, ent=0.1, kl=0.9, seeds=[0, 1])
    out = cc.claims(cmp)
    assert {k: v["verdict"] for k, v in out.items()} == {"A": "untestable", "B": "untestable", "C": "untestable",
                                                         "D": "untestable"}
    json.dumps(out)
    lines = cc.format_claims(out, 3)
    assert len(lines) == 4 and all("(indication: 3 seeds)" in ln for ln in lines)


def test_full_run_is_json_and_formats():
    cmp = a_cmp()
    src = c_cmp(fkl_all=[(0.60, 0.60), (0.35, 0.90)])
    for arm in ("grpo", "grpo-exp", "fkl-all-k0.05", "fkl-all-k0.5"):
        cmp["arms"][arm], cmp["results"][arm] = src["arms"][arm], src["results"][arm]
    d = d_cmp()
    for arm in d["arms"]:
        if arm.startswith("rec-"):
            cmp["arms"][arm], cmp["results"][arm] = d["arms"][arm], d["results"][arm]
    out = cc.claims(cmp)
    assert json.loads(json.dumps(out)).keys() == {"A", "B", "C", "D"}
    lines = cc.format_claims(out, 5)
    assert lines[0].startswith("- A — choice vs strength: **holds**. ") and "indication" not in lines[0]
    assert "**untestable**" in lines[1] and "Evidence:" in lines[2] and lines[3].startswith("- D — recovery: **")


def test_plot_frontiers_writes_both_files(tmp_path):
    cmp = a_cmp()
    add(cmp, "grpo", "grpo", 0.0, p1=0.7, p16=0.4, kl=0.9)
    add(cmp, "grpo-exp", "grpo-exp", 0.0, p1=0.65, p16=0.5, kl=0.5)
    add(cmp, "rec-dph-f-k0.25", "dph-f", 0.25, start="grpo", p1=0.1, p16=0.1)  # not on the frontier
    paths = cc.plot_frontiers(cmp, str(tmp_path))
    assert [os.path.basename(p) for p in paths] == ["frontier.png", "frontier_kl.png"]
    assert all(os.path.getsize(p) > 1000 for p in paths)
