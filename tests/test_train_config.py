"""Config: YAML files, --key=value overrides, validation, the resolved config saved and reloaded; CLI parsing."""
import glob
import os

import pytest
import yaml

from dph_train.config import Config, ConfigError, describe, load_config, parse_overrides, save_config, to_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_overrides_parse_yaml_values():
    d = parse_overrides(["--train.lr=1e-5", "--seed=3", "--eval.ks=[1,2]", "--presample.max_prompts=null",
                         "--train.loss={eta: 0.1}", "--task.kwargs={root: /x}", "--run-dir=r"])
    assert d == {"train": {"lr": 1e-5, "loss": {"eta": 0.1}}, "seed": 3, "eval": {"ks": [1, 2]},
                 "presample": {"max_prompts": None}, "task": {"kwargs": {"root": "/x"}}, "run_dir": "r"}


def test_load_apply_and_roundtrip(tmp_path):
    cfg = load_config(None, ["--train.method=rkl", "--train.steps=3", "--model.name=tiny"])
    assert cfg.train.method == "rkl" and cfg.train.steps == 3 and cfg.model.name == "tiny"
    assert cfg.rollout == Config().rollout  # untouched sections keep their defaults
    path = tmp_path / "c.yaml"
    save_config(cfg, str(path))
    again = load_config(str(path))
    assert to_dict(again) == to_dict(cfg)
    assert yaml.safe_load(path.read_text())["train"]["betas"] == [0.9, 0.999]


@pytest.mark.parametrize("bad", [["--train.lrr=1"], ["--nosuch=1"], ["--model.name.x=1"]])
def test_unknown_keys_are_errors(bad):
    with pytest.raises(ConfigError):
        load_config(None, bad)


@pytest.mark.parametrize("bad", [["--train.method=ppo"], ["--rollout.backend=x"], ["--eval.ks=[32]"],
                                 ["--train.group_size=1"], ["--presample.pef_threshold=2"],
                                 ["--train.old_logp=on_policy", "--train.ppo_epochs=2"], ["--device=tpu"]])
def test_invalid_values_are_errors(bad):
    with pytest.raises(ConfigError):
        load_config(None, bad)


def test_override_without_value_is_an_error():
    with pytest.raises(ValueError):
        parse_overrides(["--train.lr"])


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))),
                         ids=os.path.basename)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.run_dir.startswith("runs/")


def test_cpu_yaml_equals_the_defaults():
    cfg = load_config(os.path.join(ROOT, "configs", "cpu_smollm2_arith.yaml"))
    assert to_dict(cfg) == to_dict(Config())


def test_cli_rejects_stray_arguments(tmp_path):
    from dph_train.cli import main

    with pytest.raises(SystemExit):
        main(["train", "stray", f"--run_dir={tmp_path}"])
    with pytest.raises(SystemExit):
        main(["fly"])


def test_cli_reuses_the_run_dir_config(tmp_path):
    import argparse

    from dph_train.cli import resolve_config

    run = tmp_path / "r"
    first = load_config(None, [f"--run_dir={run}", "--train.steps=5", "--model.name=tiny"])
    save_config(first, str(run / "config.yaml"))
    args = argparse.Namespace(config=None, method="grpo", run_dir=str(run))
    cfg = resolve_config(args, ["--train.lr=0.5"])
    assert cfg.train.steps == 5 and cfg.model.name == "tiny"  # from the run dir's config
    assert cfg.train.method == "grpo" and cfg.train.lr == 0.5  # explicit flags win


@pytest.mark.parametrize("override, message", [
    ("--train.steps=abc", "train.steps: expected int or null, got 'abc'"),
    ("--train.lr=fast", "train.lr: expected float, got 'fast'"),
    ("--train.group_size=2.5", "train.group_size: expected int, got 2.5"),
    ("--eval.greedy=3", "eval.greedy: expected bool, got 3"),
    ("--train.micro_batch_size=true", "train.micro_batch_size: expected int, got True"),
    ("--model.name=[a]", "model.name: expected str, got ['a']"),
    ("--task.kwargs=5", "task.kwargs: expected dict, got 5"),
    ("--threads=0", "threads: expected int >= 1, got 0"),
    ("--rollout.top_p=1.5", "rollout.top_p: expected float <= 1, got 1.5"),
    ("--train.keep_checkpoints=0", "train.keep_checkpoints: expected int >= 1, got 0"),
    ("--rollout.hf_dtype=fp16", "rollout.hf_dtype: expected one of float32 | bfloat16, got 'fp16'"),
    ("--train.betas=[0.9]", "train.betas: expected two numbers in [0, 1), got [0.9]"),
    ("--train.loss={etaa: 1}", "train.loss: unknown FusedLinearDPHLoss argument(s) ['etaa']"),
    ("--train.loss={clip_low: 2}", "train.loss: clip_low must be in [0, 1)"),
    ("--train=3", "train: a config section, needs a mapping, got 3"),
])
def test_values_are_type_and_range_checked(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value).startswith(message)
    assert "\n" not in str(e.value)


def test_numbers_are_normalised():
    cfg = load_config(None, ["--train.lr=1", "--train.steps=null", "--presample.max_prompts=3"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.steps is None and cfg.presample.max_prompts == 3


def test_yaml_values_are_checked_too(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: six\n")
    with pytest.raises(ConfigError, match=r"^train.steps: expected int or null, got 'six'$"):
        load_config(str(path))
    path.write_text("train: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"^train: a config section"):
        load_config(str(path))
    path.write_text("train: {steps: [\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nosuch.yaml"))


def test_every_key_is_described():
    rows = describe()
    keys = [r[0] for r in rows]
    assert "train.steps" in keys and "eval.n" in keys and "threads" in keys
    missing = [k for k, _, _, help in rows if not help]
    assert not missing, f"config fields without a help text (a knob help or a trailing comment): {missing}"
    assert dict((r[0], r[1]) for r in rows)["train.group_size"] == "int, >= 2"


def _cli(*args, cwd=None):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "dph_train", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=60)


def test_bad_value_fails_fast_with_one_line(tmp_path):
    import time

    run = tmp_path / "r"
    t0 = time.time()
    p = _cli("run", "--train.steps=abc", f"--run_dir={run}")
    elapsed = time.time() - t0
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip() == "dph-train: error: train.steps: expected int or null, got 'abc'"
    assert elapsed < 5, f"took {elapsed:.1f}s"
    assert not run.exists()  # nothing written, nothing loaded


@pytest.mark.parametrize("args, message", [
    (["train", "--train.lrr=1"], "dph-train: error: train.lrr: unknown config key"),
    (["presample", "--config=nosuch.yaml"], "dph-train: error: config file 'nosuch.yaml' not found"),
])
def test_user_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, args, message):
    p = _cli(*args, f"--run_dir={tmp_path / 'r'}")
    assert p.returncode == 2 and p.stderr.startswith(message) and len(p.stderr.strip().splitlines()) == 1, p.stderr
    p = _cli(*args, f"--run_dir={tmp_path / 'r'}", "--debug")
    assert p.returncode != 0 and "Traceback" in p.stderr


def test_subcommand_help_lists_its_config_keys():
    run = _cli("run", "--help")
    assert run.returncode == 0
    assert "--train.steps=6  " in run.stdout and "(int or null, >= 0)" in run.stdout
    assert "--eval.n=8" in run.stdout and "--presample.n=8" in run.stdout
    pre = _cli("presample", "--help").stdout
    assert "--presample.pef_threshold=0.5" in pre and "--train.steps" not in pre
    ev = _cli("eval", "--help").stdout
    assert "--eval.ks=[1, 2, 4, 8]" in ev and "--checkpoint" in ev and "--train.lr" not in ev


def test_eval_refuses_a_run_without_checkpoint(tmp_path):
    run = tmp_path / "r"
    p = _cli("eval", f"--run_dir={run}", "--model.name=tiny")
    assert p.returncode == 2
    assert p.stderr.startswith("dph-train: error: no checkpoint in ") and "--checkpoint base" in p.stderr
    assert not (run / "eval").exists()


def test_train_refuses_a_run_without_presample(tmp_path):
    run = tmp_path / "r"
    p = _cli("train", f"--run_dir={run}", "--model.name=tiny")
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("dph-train: error: no pre-sampled data in ") and "dph-train presample" in p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not (run / "checkpoints").exists()


def test_eval_base_is_explicit(tmp_path):
    import argparse

    from dph_train.cli import UsageError, _eval_target

    cfg = load_config(None, [f"--run_dir={tmp_path}"])
    ns = lambda ck: argparse.Namespace(checkpoint=ck, tag=None)  # noqa: E731
    assert _eval_target(cfg, ns("base")) == (None, "base")
    with pytest.raises(UsageError, match="no checkpoint"):
        _eval_target(cfg, ns("latest"))
    with pytest.raises(UsageError, match="not base, latest or a folder"):
        _eval_target(cfg, ns(str(tmp_path / "nosuch")))
    ck = tmp_path / "checkpoints" / "step_000002"
    ck.mkdir(parents=True)
    (ck / "COMPLETE.json").write_text("{}")
    assert _eval_target(cfg, ns("latest")) == (str(ck), "final")


def test_wrong_task_argument_is_a_config_error_before_the_model(tmp_path, monkeypatch):
    import dph_train.models as models
    from dph_train.pipeline import Session

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model loaded before the task check"))
    cfg = load_config(None, [f"--run_dir={tmp_path}", "--task.kwargs={n_trian: 3}", "--device=cpu"])
    with pytest.raises(ConfigError, match="task 'arith'"):
        Session(cfg)
