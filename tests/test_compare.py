"""`dph-train compare` end to end at a tiny size (real SFT, presample, RL through the Trainer, eval, report), and
the styles task it runs on."""
import json
import time

from dph_train import cli
from dph_train.tasks import get_task
from dph_train.tasks.styles import STYLES, build_tokenizer, transform

# every routing (all / exp), divergence-sample source (stored D_pef / stored all prompts / on-policy), a kappa list
# and a recovery arm from the grpo checkpoint
VARIANTS = ("[{name: grpo, preset: grpo}, {name: grpo-exp, preset: grpo, routing: exp}, "
            "{name: dph-f, preset: dph-f, kappa: [0.05, 0.2]}, "
            "{name: fkl-all, preset: dph-f, kappa: 0.05, routing: all, samples: all}, "
            "{name: rkl-k2, preset: rkl-k2, kappa: 0.1}, "
            "{name: rec-dph-rkl, family: dph-rkl, preset: dph-rkl, kappa: 0.25, start: grpo, steps: 1}]")
TINY = ["--task.kwargs={n_train: 96, n_test: 16, n_ood: 16, n_t2: 8, n_t2_train: 32}", "--presample.max_prompts=48",
        "--presample.store_all=true", "--compare.seeds=[0]", f"--compare.variants={VARIANTS}",
        "--compare.sft.steps=40", "--train.steps=2", "--train.prompts_per_step=4", "--eval.n=16",
        "--eval.ks=[1, 16]", "--eval.max_prompts=null"]
ARMS = ["grpo", "grpo-exp", "dph-f-k0.05", "dph-f-k0.2", "fkl-all", "rkl-k2", "rec-dph-rkl"]


def test_styles_task_rules():
    t = get_task("styles", n_train=400, n_test=50, n_ood=50)
    train, test, ood = (t.examples(s) for s in ("train", "test", "ood-remap"))
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    assert len(ood) == 50 and not {e.prompt for e in ood} & {e.prompt for e in train + test}
    share_all = sum(e.meta["category"] == "all" for e in train) / len(train)
    assert 0.3 < share_all < 0.5
    ex = next(e for e in train if e.meta["category"] == "rev")
    letters = ex.meta["letters"]
    assert t.score(ex, "rev " + " ".join(letters[::-1])).reason == "ok"
    assert t.score(ex, "copy " + " ".join(letters)).reason == "wrong_style"
    assert t.score(ex, "rev " + " ".join(letters)).reason in ("bad_transform", "ok")  # a palindrome is both
    assert t.score(ex, "hello").reason == "no_style"
    assert transform("shift", list("cafbh")) == list("dbgca") and transform("rot", list("abc")) == list("bca")
    every = next(e for e in train if e.meta["category"] == "all")
    assert all(t.score(every, f"{s} {every.answer[s]}").reward == 1.0 for s in STYLES)
    tok = build_tokenizer()
    ids = tok(ex.prompt)["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.decode(ids, skip_special_tokens=True) == ex.prompt


def test_compare_tiny_end_to_end(tmp_path):
    run_dir = tmp_path / "cmp"
    t0 = time.time()
    assert cli.main(["compare", f"--run-dir={run_dir}", "--compare.workers=1"] + TINY) == 0
    wall = time.time() - t0
    out = json.loads((run_dir / "compare.json").read_text())
    assert out["seeds"] == [0] and out["methods"] == ["base"] + ARMS
    arms = out["arms"]
    assert arms["grpo"]["routing"] == "all" and arms["grpo-exp"]["routing"] == "exp"
    assert arms["dph-f-k0.2"]["kappa"] == 0.2 and arms["dph-f-k0.2"]["samples"] == "pef"
    assert arms["fkl-all"]["samples"] == "all" and arms["rkl-k2"]["samples"] == "on-policy"
    assert arms["rec-dph-rkl"]["start"] == "grpo" and arms["rec-dph-rkl"]["family"] == "dph-rkl"
    for m in out["methods"]:
        for split in ("test", "ood-remap", "ood-shift", "t2a", "t2b"):
            r = out["results"][m]["0"][split]
            for k in ("pass@1", "pass@16", "greedy"):
                assert 0.0 <= r[k] <= 1.0, (m, split, k, r[k])
            assert r["pass@1"] <= r["pass@16"] + 1e-12
        t = out["results"][m]["0"]["test"]
        assert 0.0 <= t["style_entropy"] <= 2.33 and 0.0 <= t["style_entropy_per_prompt"] <= t["style_entropy"] + 1e-9
        assert set(t["by_category"]) == {"all-valid", "single-style"}
        assert t["kl_ref_theta"] >= 0 and t["kl_theta_ref"] >= 0
    base = out["results"]["base"]["0"]["test"]
    assert base["kl_ref_theta"] == 0 and base["kl_theta_ref"] == 0  # base against itself
    assert base["keep@16"] in (1.0, None) and (base["explore@16"] is None or base["explore@16"] < 0.5)
    # the SFT model samples every style: near-uniform styles before RL
    assert base["style_entropy"] > 1.5
    assert set(out["claims"]) == {"A", "B", "C", "D"}
    assert all(c["verdict"] in ("holds", "does not hold", "untestable") for c in out["claims"].values())
    for f in ("report.md", "passk.png", "styles.png", "training.png", "frontier.png", "seed_0/sft/sft.json",
              "seed_0/grpo/metrics.jsonl", "seed_0/dph-f-k0.2/eval/final.json", "seed_0/base/presample/summary.json"):
        assert (run_dir / f).exists(), f
    report = (run_dir / "report.md").read_text()
    assert "| dph-f-k0.2 |" in report and "Paired differences" in report and "Pre-registered verdicts" in report
    # each arm ran with its own settings
    cfg = lambda arm: (run_dir / "seed_0" / arm / "config.yaml").read_text()  # noqa: E731
    assert "eta: 0.2" in cfg("dph-f-k0.2") and "kl_beta: 0.1" in cfg("rkl-k2") and "kl_estimator" not in cfg("grpo")
    assert "divergence_samples: all" in cfg("fkl-all") and "routing: all" in cfg("fkl-all")
    assert "routing: exp" in cfg("grpo-exp")
    rec = (run_dir / "seed_0" / "rec-dph-rkl" / "log.txt").read_text()
    assert "steps=1 " in rec and "routing=exp" in rec
    assert "seed_0/grpo/checkpoints/step_000002" in cfg("rec-dph-rkl")  # started from grpo's final checkpoint
    assert wall < 60, f"tiny compare took {wall:.0f} s"

    # the same jobs in 2 spawned worker processes (the default path of `make run`) give the same numbers
    pooled = tmp_path / "pooled"
    assert cli.main(["compare", f"--run-dir={pooled}", "--compare.workers=2"] + TINY) == 0
    assert json.loads((pooled / "compare.json").read_text())["results"] == out["results"]


def test_compare_rejects_bad_settings_in_one_line(tmp_path, capsys):
    for bad, key in ((["--task.name=arith", "--eval.splits=[test]"], "task.name"),
                     ("--compare.variants=[{name: x, preset: ppo}]", "compare.variants[0].preset"),
                     ("--compare.variants=[{name: g, preset: grpo, kappa: 0.1}]", "compare.variants[0].kappa"),
                     ("--compare.variants=[{name: r, preset: dph-f, start: grpo}]", "compare.variants"),
                     ("--compare.variants=[{name: a, preset: dph-f, samples: all}]", "compare.variants"),
                     ("--eval.ks=[1, 8]", "eval.ks")):
        assert cli.main(["compare", f"--run-dir={tmp_path}"] + ([bad] if isinstance(bad, str) else bad)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"dph-train: error: {key}"), err


def test_summarize_realised_kl_and_keep_explore():
    """The measurements relative to base, on hand-made evals: exact KL of the first-token style distribution in both
    directions, and keep / explore at k = 16 (n = 16: a prompt's Pass@16 is 1 iff any sample is correct)."""
    import math

    from dph_train.compare import summarize

    def ev(probs, counts):
        split = dict(pass_at_k={"1": 0.5, "16": 0.5}, correct_counts=counts, style_first_token_probs=probs)
        return dict(n=16, splits={"test": split})

    base = ev([[0.25, 0.25, 0.25, 0.25, 0.0]] * 2, [16, 0])
    arm = ev([[0.7, 0.1, 0.1, 0.1, 0.0], [0.25, 0.25, 0.25, 0.25, 0.0]], [0, 3])
    s = summarize(arm, base)["test"]
    q = [0.7, 0.1, 0.1, 0.1]
    assert math.isclose(s["kl_ref_theta"], sum(0.25 * math.log(0.25 / x) for x in q) / 2, rel_tol=1e-12)
    assert math.isclose(s["kl_theta_ref"], sum(x * math.log(x / 0.25) for x in q) / 2, rel_tol=1e-12)
    assert s["keep@16"] == 0.0 and s["explore@16"] == 1.0  # lost the prompt base solved, found the one it missed
