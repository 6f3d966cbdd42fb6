"""CI end-to-end on the tiny random-init Llama: presample -> train 2 steps -> eval (-> resume 1 more step), through
the real CLI entry point, in one process. Asserts the files, their shapes, and that the loss changed the weights.

The reward is ParityTask's (see dph_train/testing.py): a random model never solves arithmetic, so with the real
verifier every advantage would be 0 and nothing would be near-perfect; parity gives both loss terms work to do.
"""
import json
import os
import time

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("datasets")

import dph_train.tasks as tasks_mod  # noqa: E402
from dph_train.cli import main  # noqa: E402
from dph_train.testing import ParityTask, tiny_args  # noqa: E402


def _load_safetensors(folder):
    from safetensors.torch import load_file

    sd = {}
    for f in os.listdir(folder):
        if f.endswith(".safetensors"):
            sd.update(load_file(os.path.join(folder, f)))
    return sd


@pytest.mark.timeout(300)
def test_presample_train_eval_resume(tmp_path, monkeypatch):
    t0 = time.time()
    real_get_task = tasks_mod.get_task
    monkeypatch.setattr(tasks_mod, "get_task", lambda name, **kw: ParityTask(**kw) if name == "arith"
                        else real_get_task(name, **kw))
    run = tmp_path / "run"
    args = tiny_args(run)

    assert main(["presample", *args]) == 0
    summary = json.loads((run / "presample" / "summary.json").read_text())
    assert summary["n_prompts"] == 12 and summary["n"] == 4
    assert summary["n_exp"] + summary["n_pef"] == 12
    assert summary["n_pef"] > 0 and summary["n_exp"] > 0 and summary["n_pef_samples"] > 0
    from datasets import load_from_disk

    dd = load_from_disk(str(run / "presample" / "data"))
    assert set(dd.keys()) == {"prompts", "pef"}
    assert len(dd["prompts"]) == 12 and len(dd["pef"]) == summary["n_pef_samples"]
    for row in dd["pef"]:
        assert len(row["ref_logp"]) == len(row["response_ids"]) > 0
        assert all(v <= 1e-6 for v in row["ref_logp"])
        assert row["correct"]

    # The stored log pi_ref equals log_softmax of the base model's logits at the stored tokens.
    from dph_train.config import ModelConfig
    from dph_train.models import load_model

    base, _ = load_model(ModelConfig(name="tiny", gradient_checkpointing=False), "cpu", verbose=False)
    row = dd["pef"][0]
    ids = torch.tensor([row["prompt_ids"] + row["response_ids"]])
    with torch.no_grad():
        logits = base(input_ids=ids).logits.double()
    P, R = len(row["prompt_ids"]), len(row["response_ids"])
    want = torch.log_softmax(logits[0, P - 1:P - 1 + R], -1).gather(-1, ids[0, P:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(row["ref_logp"], dtype=torch.float64), want, atol=2e-5, rtol=0)

    assert main(["train", "--method", "dph-js", *args]) == 0
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2]
    for r in recs:
        assert r["n_exp_seqs"] == 8 and r["n_pef_seqs"] == 4
        assert r["grad_norm"] > 0 and r["exp_tokens"] > 0 and r["pef_tokens"] > 0
        assert 0 <= r["reward_mean"] <= 1 and sum(r["reasons"].values()) == 8
        for k in ("accuracy", "entropy", "train_tokens_per_s", "peak_memory_mb", "time_step", "loss"):
            assert r[k] is not None
    ck = run / "checkpoints" / "step_000002"
    assert (ck / "trainer_state.pt").exists() and (ck / "COMPLETE.json").exists() and (ck / "config.json").exists()
    trained = _load_safetensors(str(ck))
    base_sd = base.state_dict()
    changed = [k for k, v in trained.items() if not torch.equal(v, base_sd[k])]
    # weight_decay=0 in tiny_args: every change comes from the loss's gradients
    assert "model.embed_tokens.weight" in changed and any("layers.0" in k for k in changed), changed

    assert main(["eval", *args]) == 0
    res = json.loads((run / "eval" / "final.json").read_text())
    assert set(res["splits"]) == {"test", "ood"}
    for split in res["splits"].values():
        assert split["n_prompts"] == 4 and len(split["correct_counts"]) == 4
        assert set(split["pass_at_k"]) == {"1", "2", "4"}
        assert all(0.0 <= v <= 1.0 for v in split["pass_at_k"].values())
        assert 0.0 <= split["greedy"] <= 1.0
    assert (run / "eval" / "passk.png").stat().st_size > 1000
    assert (run / "config.yaml").exists() and (run / "log.txt").exists()
    assert json.loads((run / "status.json").read_text())["state"] == "done"

    # --resume continues from step 2 to step 3 instead of starting over
    assert main(["train", "--resume", *args, "--train.steps=3"]) == 0
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert (run / "checkpoints" / "step_000003" / "COMPLETE.json").exists()
    assert not (run / "checkpoints" / "step_000002").exists()  # keep_checkpoints=1
    elapsed = time.time() - t0
    print(f"e2e tiny: {elapsed:.1f}s")
    assert elapsed < 90, f"the CI end-to-end took {elapsed:.0f}s (budget 90s)"


def test_failed_run_leaves_readable_logs(tmp_path):
    run = tmp_path / "run"
    (run / "presample" / "data").mkdir(parents=True)  # a presample folder that is not a dataset
    with pytest.raises(FileNotFoundError):
        main(["train", *tiny_args(run)])
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "failed" and "presample" in status["error"]
    assert "Traceback" in (run / "log.txt").read_text()
