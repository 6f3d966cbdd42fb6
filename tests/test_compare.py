"""`dph-train compare` end to end at a tiny size (real SFT, presample, RL through the Trainer, eval, report), and
the styles task it runs on."""
import json
import os
import time

from dph_train import cli
from dph_train.tasks import get_task
from dph_train.tasks.styles import STYLES, build_tokenizer, transform

TINY = ["--task.kwargs={n_train: 96, n_test: 16, n_ood: 16}", "--presample.max_prompts=48",
        "--compare.seeds=[0]", "--compare.methods=[grpo, dph-js]", "--compare.rkl_betas=[0.1]",
        "--compare.sft.steps=40", "--train.steps=2", "--train.prompts_per_step=4", "--eval.n=16",
        "--eval.ks=[1, 16]", "--eval.max_prompts=null"]


def test_styles_task_rules():
    t = get_task("styles", n_train=400, n_test=50, n_ood=50)
    train, test, ood = (t.examples(s) for s in ("train", "test", "ood"))
    assert not {e.prompt for e in train} & {e.prompt for e in test}
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
    assert out["seeds"] == [0] and out["methods"] == ["base", "grpo", "dph-js", "rkl-b0.1"]
    for m in out["methods"]:
        for split in ("test", "ood"):
            r = out["results"][m]["0"][split]
            for k in ("pass@1", "pass@16", "greedy"):
                assert 0.0 <= r[k] <= 1.0, (m, split, k, r[k])
            assert r["pass@1"] <= r["pass@16"] + 1e-12
            assert 0.0 <= r["style_entropy"] <= 2.33 and 0.0 <= r["style_entropy_per_prompt"] <= r["style_entropy"] + 1e-9
    # the SFT model samples every style: near-uniform styles before RL
    assert out["results"]["base"]["0"]["test"]["style_entropy"] > 1.5
    for f in ("report.md", "passk.png", "styles.png", "training.png", "seed_0/sft/sft.json",
              "seed_0/grpo/metrics.jsonl", "seed_0/dph-js/eval/final.json", "seed_0/base/presample/summary.json"):
        assert (run_dir / f).exists(), f
    report = (run_dir / "report.md").read_text()
    assert "| dph-js |" in report and "Paired differences" in report and "does not" in report
    # the RKL sweep run used its own beta
    cfg = (run_dir / "seed_0" / "rkl-b0.1" / "config.yaml").read_text()
    assert "kl_beta: 0.1" in cfg
    assert wall < 60, f"tiny compare took {wall:.0f} s"

    # the same jobs in 2 spawned worker processes (the default path of `make run`) give the same numbers
    pooled = tmp_path / "pooled"
    assert cli.main(["compare", f"--run-dir={pooled}", "--compare.workers=2"] + TINY) == 0
    assert json.loads((pooled / "compare.json").read_text())["results"] == out["results"]


def test_compare_rejects_bad_settings_in_one_line(tmp_path, capsys):
    for bad, key in (("--task.name=arith", "task.name"), ("--compare.methods=[grpo, ppo]", "compare.methods"),
                     ("--eval.ks=[1, 8]", "eval.ks")):
        assert cli.main(["compare", f"--run-dir={tmp_path}", bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"dph-train: error: {key}"), err
