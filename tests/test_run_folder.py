"""Run folders and memory: the last K checkpoints, the optimizer state only when asked, peak RSS per phase in the
log, gradients freed between steps, and no weight-sized spike in bf16 generation."""
import json
import re

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("datasets")

from dph_train.cli import main  # noqa: E402
from dph_train.common import reset_peak_rss, rss_mb  # noqa: E402
from dph_train.testing import tiny_args  # noqa: E402


def _state(ck):
    return torch.load(ck / "trainer_state.pt", map_location="cpu", weights_only=False)


@pytest.mark.timeout(300)
def test_checkpoints_kept_optimizer_state_and_memory_lines(tmp_path, parity):
    run = tmp_path / "run"
    args = tiny_args(run, train__steps=3, train__save_every=1, train__keep_checkpoints=2)
    assert main(["presample", *args]) == 0
    assert main(["train", *args]) == 0
    cks = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert cks == ["step_000002", "step_000003"]  # keep_checkpoints=2 of 3 saves
    state = _state(run / "checkpoints" / "step_000003")
    assert "optimizer" not in state and state["step"] == 3  # save_optimizer defaults to off
    assert not (run / "checkpoints" / "step_000003" / "optimizer").exists()

    log = (run / "log.txt").read_text()
    for phase in ("load model", "presample", "train"):
        m = re.search(rf"\[mem\] {phase}: peak RSS (\d+) MiB, RSS after (\d+) MiB", log)
        assert m and int(m.group(1)) >= int(m.group(2)) > 0, phase
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["peak_memory_mb"] > 0 for r in recs)

    # a resume from a checkpoint without optimizer state works and says so
    assert main(["train", "--resume", *tiny_args(run, train__steps=4, train__keep_checkpoints=2)]) == 0
    assert "has no optimizer state" in (run / "log.txt").read_text()

    # with save_optimizer the state is there, and a resume loads it
    assert main(["train", "--resume", *tiny_args(run, train__steps=5, train__save_optimizer="true")]) == 0
    ck = run / "checkpoints" / "step_000005"
    assert _state(ck)["step"] == 5 and (ck / "optimizer" / ".metadata").exists()  # DCP (dph_train/parallel.py)


def test_gradients_are_freed_after_the_optimizer_step(tmp_path, parity):
    from dph_train.config import load_config
    from dph_train.pipeline import Session
    from dph_train.presample import presample
    from dph_train.trainer import Trainer

    cfg = load_config(None, tiny_args(tmp_path / "r"))
    s = Session(cfg)
    presample(cfg, s.model, s.tok, s.task, s.engine, s.run, s.device)
    from dph_train.presample import load_presample

    rows, pef, _ = load_presample(s.run.p("presample"))
    tr = Trainer(cfg, s.model, s.tok, s.task, s.engine, s.run, s.device, rows, pef)
    rec = tr.train_step()
    assert rec["grad_norm"] > 0
    assert all(p.grad is None for p in s.model.parameters())


def test_reset_peak_rss_starts_a_new_window():
    reset_peak_rss()
    x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    del x
    _, peak_with = rss_mb()
    reset_peak_rss()
    now, peak_after = rss_mb()
    assert peak_with - peak_after > 40, (peak_with, peak_after)
    assert peak_after >= now * 0.9


def test_bf16_generation_has_no_weight_sized_spike():
    """generate() gives lm_head a strided (B, 1, D) slice; on the CPU a bf16 linear on it broadcast the weight to B
    copies (torch 2.13). The engine's bf16 copy makes the input contiguous."""
    from dph_train.config import ModelConfig, RolloutConfig
    from dph_train.models import load_model
    from dph_train.rollout import HFEngine

    model, tok = load_model(ModelConfig(name="tiny", tiny_hidden_size=128), "cpu", verbose=False)
    V, D = model.get_output_embeddings().weight.shape
    eng = HFEngine(model, tok, RolloutConfig(hf_dtype="bfloat16", max_new_tokens=2), ModelConfig(), torch.device("cpu"))
    prompts = [[1, 2, 3, 4]] * 64
    eng.generate(prompts[:2], temperature=1.0, top_p=1.0)  # warm up
    reset_peak_rss()
    base = rss_mb()[0]
    eng.generate(prompts, temperature=1.0, top_p=1.0)
    extra = rss_mb()[1] - base
    broadcast_mb = 64 * V * D * 2 / 2**20  # what the broadcast copies would take
    assert extra < broadcast_mb / 4, f"generate took {extra:.0f} MiB extra (broadcast would be {broadcast_mb:.0f})"
