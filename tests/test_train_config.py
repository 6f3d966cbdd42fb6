"""Config: YAML files, --key=value overrides, validation, the resolved config saved and reloaded; CLI parsing."""
import glob
import os

import pytest
import yaml

from dph_train.config import Config, load_config, parse_overrides, save_config, to_dict

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
    with pytest.raises((KeyError, TypeError)):
        load_config(None, bad)


@pytest.mark.parametrize("bad", [["--train.method=ppo"], ["--rollout.backend=x"], ["--eval.ks=[32]"],
                                 ["--train.group_size=1"], ["--presample.pef_threshold=2"],
                                 ["--train.old_logp=on_policy", "--train.ppo_epochs=2"], ["--device=tpu"]])
def test_invalid_values_are_errors(bad):
    with pytest.raises(ValueError):
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
