"""The styles task's extra splits (ood-remap, ood-shift, the t2 forgetting probes), its tokenizer, and the per-category
and first-token numbers that `evaluate` writes for it."""
import pytest
import torch

from dph_train.tasks import SPLITS, check_split, get_task, task_splits
from dph_train.tasks.styles import ALL_VALID_FIRST, NAMING_LETTERS, STYLES, StylesTask, build_tokenizer, transform


@pytest.fixture(scope="module")
def task():
    return get_task("styles", seed=0, n_train=1000, n_test=100, n_ood=1000, n_t2=50, n_t2_train=200)


def _shares(examples):
    return {c: sum(e.meta["category"] == c for e in examples) / len(examples) for c in ("all",) + STYLES}


def test_split_names_sizes_and_all_prompts_disjoint(task):
    assert StylesTask.SPLITS == task_splits("styles") and task_splits("arith") == SPLITS
    sizes = {s: len(task.examples(s)) for s in StylesTask.SPLITS}
    assert sizes == {"train": 1000, "test": 100, "ood-remap": 1000, "ood-shift": 1000, "t2a": 50, "t2b": 50,
                     "t2-train": 400}
    prompts = [e.prompt for s in StylesTask.SPLITS for e in task.examples(s)]
    ids = [e.id for s in StylesTask.SPLITS for e in task.examples(s)]
    assert len(set(prompts)) == len(prompts) and len(set(ids)) == len(ids)
    with pytest.raises(ValueError, match="ood-remap"):
        task.examples("ood")  # renamed, no alias
    assert check_split("t2a", StylesTask.SPLITS) == "t2a"
    with pytest.raises(ValueError):
        check_split("t2a")  # the default list is the other tasks'


def test_existing_splits_keep_their_prompts():
    # the probes and ood-shift are drawn after, from their own streams: sizing them never moves an older prompt
    a = StylesTask(seed=3, n_train=60, n_test=20, n_ood=30, n_t2=0, n_t2_train=0)
    b = StylesTask(seed=3, n_train=60, n_test=20, n_ood=30, n_t2=40, n_t2_train=90)
    for split in ("train", "test", "ood-remap", "ood-shift"):
        assert [e.prompt for e in a.examples(split)] == [e.prompt for e in b.examples(split)]


def test_ood_shift_has_the_training_rules_with_reversed_shares(task):
    train, shift, remap = _shares(task.examples("train")), _shares(task.examples("ood-shift")), \
        _shares(task.examples("ood-remap"))
    assert shift["shift"] > 0.22 and shift["copy"] < 0.09 and shift["shift"] > shift["rot"] > shift["copy"]
    assert train["copy"] > 0.22 and train["shift"] < 0.09
    assert 0.33 < shift["all"] < 0.47 and 0.14 < remap["all"] < 0.26
    for e in task.examples("ood-shift"):  # the same last letter names the same style as in train
        letters, cat = e.meta["letters"], e.meta["category"]
        if cat == "all":
            assert letters[0] in ALL_VALID_FIRST and e.meta["valid"] == list(STYLES)
        else:
            assert letters[0] not in ALL_VALID_FIRST and letters[-1] in NAMING_LETTERS["train"][cat]
            assert e.meta["valid"] == [cat]
    ex = next(e for e in task.examples("ood-shift") if e.meta["category"] == "copy")
    assert ex.meta["letters"][-1] in "ab"
    assert task.score(ex, "copy " + " ".join(ex.meta["letters"])).reason == "ok"
    assert task.score(ex, "shift " + " ".join(transform("shift", ex.meta["letters"]))).reason == "wrong_style"
    # ood-remap is the conflicting rule: a last letter a / b names shift there
    ex = next(e for e in task.examples("ood-remap") if e.meta["category"] == "shift")
    assert ex.meta["letters"][-1] in "ab"


def test_t2_probes_score_right_and_wrong_answers(task):
    assert transform("swap", list("cafbh")) == list("acbfh")
    a, b = task.examples("t2a")[0], task.examples("t2b")[0]
    la, lb = a.meta["letters"], b.meta["letters"]
    assert a.prompt == "x " + " ".join(la) + " =" and b.prompt == "y " + " ".join(lb) + " ="
    assert (a.meta["category"], a.meta["valid"], b.meta["category"], b.meta["valid"]) == ("t2a", ["swap"], "t2b", ["rot"])
    swap = [la[1], la[0], la[3], la[2], la[4]]
    assert task.score(a, "swap " + " ".join(swap)) == task.score(a, f"swap {a.answer['swap']}")
    assert task.score(a, "swap " + " ".join(swap)).reason == "ok"
    assert task.score(a, "swap " + " ".join(la[::-1] + ["a"])).reason == "bad_transform"
    assert task.score(a, "copy " + " ".join(la)).reason == "wrong_style"
    assert task.score(a, "").reason == "no_style"
    assert task.score(b, "rot " + " ".join(lb[1:] + lb[:1])).reason == "ok"
    assert task.score(b, "swap " + " ".join(transform("swap", lb))).reason == "wrong_style"
    assert task.score(b, "rot " + " ".join(lb + ["a"])).reason == "bad_transform"
    assert task.score(b, "rotate it").reason == "no_style"
    for split in ("t2a", "t2b", "t2-train"):
        for e in task.examples(split):
            r = task.score(e, f"{e.meta['valid'][0]} {e.answer[e.meta['valid'][0]]}")
            assert r.reward == 1.0 and r.reason in task.REASONS
    kinds = [e.meta["category"] for e in task.examples("t2-train")]
    assert kinds.count("t2a") == kinds.count("t2b") == 200
    assert not any(e.prompt[0] in "xy" for s in ("train", "test", "ood-remap", "ood-shift") for e in task.examples(s))
    assert task.style_of("swap a b c d e") is None  # style_of stays the four styles


def test_category_group(task):
    groups = {e.meta["category"]: task.category_group(e) for s in StylesTask.SPLITS for e in task.examples(s)}
    assert groups == {"all": "all-valid", "copy": "single-style", "rev": "single-style", "rot": "single-style",
                      "shift": "single-style", "t2a": None, "t2b": None}


def test_tokenizer_keeps_old_ids_and_new_words_are_single_tokens():
    tok = build_tokenizer()
    old = ["<pad>", "<bos>", "<eos>", "<unk>"] + list("abcdefgh") + list(STYLES) + ["="]
    assert [tok.convert_tokens_to_ids(w) for w in old] == list(range(len(old)))
    new = [tok(w, add_special_tokens=False)["input_ids"] for w in ("x", "y", "swap")]
    assert new == [[len(old)], [len(old) + 1], [len(old) + 2]] and len(tok) == len(old) + 3
    ids = tok("x c a f b h =")["input_ids"]
    assert tok.unk_token_id not in ids and tok.decode(ids, skip_special_tokens=True) == "x c a f b h ="


def test_evaluate_by_category_and_first_token_probs(tmp_path):
    from dph_train.common import RunDir, encode_prompt
    from dph_train.config import Config, SFTConfig, validate
    from dph_train.evaluate import evaluate
    from dph_train.rollout import HFEngine
    from dph_train.sft import build_model

    task = get_task("styles", seed=0, n_train=8, n_test=12, n_ood=4, n_t2=3, n_t2_train=3)
    tok = build_tokenizer()
    model = build_model(tok, SFTConfig(hidden_size=16, layers=1, heads=2, intermediate_size=32), seed=0)
    model.generation_config.pad_token_id = tok.pad_token_id
    cfg = Config()
    cfg.task.name, cfg.task.chat_template = "styles", False
    cfg.rollout.hf_dtype, cfg.rollout.max_new_tokens = "float32", 7
    cfg.eval.splits, cfg.eval.n, cfg.eval.ks, cfg.eval.max_prompts = ["test", "t2a"], 16, [1, 4, 16], None
    validate(cfg)
    engine = HFEngine(model, tok, cfg.rollout, cfg.model, torch.device("cpu"))
    res = evaluate(cfg, model, tok, task, engine, RunDir(str(tmp_path)), "base")["splits"]

    test = res["test"]
    cats = [task.category_group(e) for e in task.examples("test")]
    assert test["categories"] == cats and len(cats) == len(test["correct_counts"])
    assert set(test["by_category"]) == set(cats) == {"all-valid", "single-style"}
    for g, r in test["by_category"].items():
        idx = [i for i, c in enumerate(cats) if c == g]
        assert r["n_prompts"] == len(idx)
        assert r["sample_accuracy"] == pytest.approx(sum(test["correct_counts"][i] for i in idx) / (16 * len(idx)))
        assert r["pass@1"] == pytest.approx(r["sample_accuracy"]) and r["pass@16"] == r["pass_at_k"]["16"]
        assert {"style_entropy", "style_entropy_per_prompt"} <= set(r)
    assert res["t2a"]["categories"] == [None] * 3 and res["t2a"]["by_category"] == {}

    assert test["style_first_token_names"] == list(STYLES) + ["other"]
    probs = torch.tensor(test["style_first_token_probs"], dtype=torch.float64)
    assert probs.shape == (12, 5) and (probs >= 0).all()
    assert torch.allclose(probs.sum(-1), torch.ones(12, dtype=torch.float64), atol=1e-5)
    style_ids = [tok.convert_tokens_to_ids(s) for s in STYLES]
    with torch.no_grad():
        for row, ex in zip(probs, task.examples("test")):
            ids = torch.tensor([encode_prompt(tok, ex.prompt, cfg.task)])
            p = torch.softmax(model(input_ids=ids).logits[0, -1].double(), -1)
            want = torch.cat([p[style_ids], (1 - p[style_ids].sum()).clamp(min=0).reshape(1)])
            assert torch.allclose(row, want, atol=1e-5), (row, want)


def test_eval_splits_are_checked_against_the_tasks_own_splits():
    from dph_train.config import Config, ConfigError, validate

    cfg = Config()
    cfg.task.name, cfg.eval.splits = "styles", ["test", "ood-shift", "t2a", "t2b"]
    validate(cfg)
    cfg.eval.splits = ["test", "ood"]
    with pytest.raises(ConfigError, match="eval.splits: .*ood-remap \\| ood-shift.*got \\['ood'\\]"):
        validate(cfg)
    cfg.task.name = "arith"
    validate(cfg)  # the other tasks keep train | test | ood


def test_first_token_probs_refuses_a_multi_token_style_word():
    from dph_train.config import Config, SFTConfig
    from dph_train.evaluate import first_token_probs
    from dph_train.sft import build_model

    tok = build_tokenizer()
    model = build_model(tok, SFTConfig(hidden_size=16, layers=1, heads=2, intermediate_size=32), seed=0)
    with pytest.raises(ValueError, match="'copy a' is 2 tokens"):
        first_token_probs(Config(), model, tok, [tok("c a f b h =")["input_ids"]], ("rev", "copy a"))
