"""What a run survives: a SIGKILL then --resume (each step logged once, bitwise the same weights), a non-finite loss
(stops before the optimizer step, the last good checkpoint kept, status.json says which step), a checkpoint write
that fails (the earlier checkpoints intact, the error names the path), and stored log-probs that cannot be
log-probs (rejected by the fused loss and by the presample loader, naming the position)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("datasets")

import dph_kernels as dk  # noqa: E402
from dph_train.cli import main  # noqa: E402
from dph_train.testing import tiny_args  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def _weights(ck):
    from safetensors.torch import load_file
    out = {}
    for f in sorted(os.listdir(ck)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(ck, f)))
    return out


def _steps(run):
    return [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def _worker(run, *extra, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([os.path.dirname(HERE),
                                                                          os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, os.path.join(HERE, "parallel_train_worker.py"), "train", *extra,
           *tiny_args(run, train__steps=6, train__save_every=2, train__save_optimizer="true", **kw)]
    return subprocess.Popen(cmd, cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.timeout(300)
def test_sigkill_then_resume_logs_each_step_once_and_ends_bitwise_equal(tmp_path, parity):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert main(["presample", *tiny_args(whole)]) == 0
    shutil.copytree(whole / "presample", killed / "presample")
    ref = _worker(whole)
    out, _ = ref.communicate(timeout=240)
    assert ref.returncode == 0, out[-3000:]

    proc = _worker(killed)
    deadline = time.time() + 200
    while time.time() < deadline and proc.poll() is None:  # killed once step 3 is logged (last checkpoint: step 2)
        if (killed / "metrics.jsonl").exists() and len(_steps(killed)) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {p.name for p in (killed / "checkpoints").iterdir() if (p / "COMPLETE.json").exists()}
    assert len(_steps(killed)) > max(int(d.split("_")[1]) for d in done)  # a step logged after the last checkpoint

    resumed = _worker(killed, "--resume")
    out, _ = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, out[-3000:]
    assert "dropped" in (killed / "log.txt").read_text()
    assert _steps(killed) == _steps(whole) == [1, 2, 3, 4, 5, 6]
    a, b = _weights(whole / "checkpoints" / "step_000006"), _weights(killed / "checkpoints" / "step_000006")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.timeout(300)
def test_non_finite_loss_stops_before_the_optimizer_step(tmp_path, parity, monkeypatch, capsys):
    from dph_train.trainer import Trainer

    real = Trainer._micro_loss

    def poisoned(self, *a, **kw):  # step 3's loss is NaN
        out = real(self, *a, **kw)
        if self.step == 2 and out.loss.requires_grad:
            out.loss = out.loss * float("nan")
            out.metrics["loss"] = float("nan")
        return out

    monkeypatch.setattr(Trainer, "_micro_loss", poisoned)
    run = tmp_path / "run"
    args = tiny_args(run, train__steps=4, train__save_every=1, train__keep_checkpoints=5)
    assert main(["presample", *args]) == 0
    assert main(["train", *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert any("step 3: non-finite loss" in line for line in err), err
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "failed" and status["step"] == 3 and "step 3" in status["error"]
    cks = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert cks == ["step_000001", "step_000002"]  # nothing after the last good step
    assert _steps(run) == [1, 2]
    w = _weights(run / "checkpoints" / "step_000002")
    assert all(torch.isfinite(t).all() for t in w.values())


@pytest.mark.timeout(300)
def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, parity, monkeypatch, capsys):
    import dph_train.trainer as trainer_mod

    real = trainer_mod.save_hf_folder

    def disk_full(model, tok, folder):
        if folder.endswith("step_000002.tmp"):
            real(model, tok, folder)  # half written, then the disk is full
            raise OSError(28, "No space left on device")
        return real(model, tok, folder)

    monkeypatch.setattr(trainer_mod, "save_hf_folder", disk_full)
    run = tmp_path / "run"
    args = tiny_args(run, train__steps=3, train__save_every=1, train__keep_checkpoints=5)
    assert main(["presample", *args]) == 0
    assert main(["train", *args]) == 1
    err = capsys.readouterr().err
    assert "step_000002.tmp" in err and "No space left on device" in err and "step_000001" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000001"]  # no .tmp left behind
    ck = run / "checkpoints" / "step_000001"
    assert json.loads((ck / "COMPLETE.json").read_text())["step"] == 1 and _weights(ck)
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "failed" and "step_000002.tmp" in status["error"]


def test_stored_logprobs_are_checked_where_they_are_read():
    g = torch.Generator().manual_seed(0)
    B, T, D, V = 4, 6, 16, 50
    h, w = torch.randn(B, T, D, generator=g), torch.randn(V, D, generator=g) / 4
    tgt = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[:, -1] = False  # padding: anything goes there
    is_pef = torch.tensor([False, True, False, True])
    old, ref = -torch.rand(B, T, generator=g), -torch.rand(B, T, generator=g)
    old[:, -1], ref[0] = float("nan"), 5.0  # padding, and ref_logp of a D_exp row: never read
    loss_fn = dk.FusedLinearDPHLoss.preset("dph-js")
    kw = dict(advantages=torch.randn(B, generator=g), old_logp=old, ref_logp=ref)
    assert torch.isfinite(loss_fn(h, w, tgt, mask, is_pef, **kw).loss)
    bad = ref.clone()
    bad[3, 2] = 0.5
    with pytest.raises(ValueError, match=r"ref_logp\[3, 2\] = 0.5"):
        loss_fn(h, w, tgt, mask, is_pef, **{**kw, "ref_logp": bad})
    bad = old.clone()
    bad[2, 4] = float("nan")
    with pytest.raises(ValueError, match=r"old_logp\[2, 4\] = nan"):
        loss_fn(h, w, tgt, mask, is_pef, **{**kw, "old_logp": bad})
    bad[2, 4] = 2e-4  # rounding above 0 is a log-prob still
    assert torch.isfinite(loss_fn(h, w, tgt, mask, is_pef, **{**kw, "old_logp": bad}).loss)


def test_presample_folder_with_a_positive_logprob_is_rejected(tmp_path, parity):
    from datasets import load_from_disk

    from dph_train.presample import load_presample, presampled_data, save_presample

    run = tmp_path / "run"
    assert main(["presample", *tiny_args(run, presample__pef_threshold=0.0)]) == 0
    folder = str(run / "presample")
    prompts, pef, summary = load_presample(folder)
    assert pef, "the tiny presample should keep D_pef samples at pef_threshold=0"
    assert load_from_disk(presampled_data(folder))  # readable as written
    pef[1]["ref_logp"][2] = 0.7
    save_presample(folder, prompts, pef, summary)
    with pytest.raises(ValueError, match=r"D_pef row 1 .*ref_logp\[2\] = 0.7"):
        load_presample(folder)
