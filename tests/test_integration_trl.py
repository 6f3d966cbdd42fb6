"""DPHGRPOTrainer against the real trl.GRPOTrainer (trl==1.16.0), on a tiny Llama built from a config.

* parity: with no stored samples, DPHGRPOTrainer and GRPOTrainer (same model, data, seeds; 3 optimizer steps of 2
  micro-batches, 2 iterations per generation so log pi_old and the clip are live) end with the same parameters
  within 1e-5 relative, per tensor, for each loss type, beta = 0 and > 0; TRL's metrics agree too;
* the loss path never calls lm_head's forward and never runs TRL's own log-prob kernel;
* stored D_pef rows get exactly dk.FusedLinearDPHLoss's divergence loss (value and gradients);
* build_pef_dataset / `dph-train presample` folders load as pef_dataset, and a DPH-RL run trains;
* 2 processes (torchrun, gloo, DDP through accelerate) train with stored samples and stay in sync.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("trl", reason="trl is not installed (pip install 'dph[trl]')")

import trl_helpers as H  # noqa: E402  (tests/ is on sys.path under pytest's rootdir conftest)
from trl import GRPOTrainer  # noqa: E402

import dph_kernels as dk  # noqa: E402
from dph_kernels.integrations import trl as dktrl  # noqa: E402

TOL = 1e-5
# Adam's default eps (1e-8) turns fp32 rounding noise in near-zero gradients into lr-sized steps; 1e-6 is still far
# below every real gradient here (1e-4 .. 1e-1), so the optimizer behaves the same and parity measures the loss.
PARITY_ARGS = dict(gradient_accumulation_steps=2, num_iterations=2, adam_epsilon=1e-6)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return H.save_tiny_model(str(tmp_path_factory.mktemp("tiny_llama")))


def _params(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def _train(cls, model_dir, out_dir, reward=H.reward_letters, train_dataset=None, **kw):
    cfg_kw = {k: kw.pop(k) for k in list(kw) if k not in ("pef_dataset", "dph", "pef_per_step")}
    args = H.grpo_config(out_dir, **cfg_kw)
    trainer = cls(model=model_dir, reward_funcs=reward, args=args, train_dataset=train_dataset or H.prompt_dataset(),
                  processing_class=H.make_tokenizer(), **kw)
    return trainer


class _NoTRLKernel:
    @staticmethod
    def apply(*a, **k):
        raise AssertionError("TRL's chunked log-prob kernel ran inside DPHGRPOTrainer")


# beta > 0 runs with TRL's plain k3 penalty (use_bias_correction_kl=False); TRL's default multiplies it by the
# ratio, which dk's loss does not express: that case runs TRL's loss math on dk's log-probs (the last case).
CASES = [
    dict(loss_type=lt, beta=beta, epsilon_high=0.28, delta=1.5, **({"use_bias_correction_kl": False} if beta else {}))
    for lt in ("grpo", "bnpo", "dr_grpo", "dapo") for beta in (0.0, 0.04)
] + [dict(loss_type="grpo", beta=0.0),  # TRL's defaults otherwise: symmetric clip, no delta
     dict(loss_type="dapo", beta=0.04)]  # use_bias_correction_kl=True (TRL's default): fallback
# The sequence-level and newer losses, fused by dk (no fallback): GSPO (grpo at sequence level, the GSPO paper's
# clip 3e-4 / 4e-4), LUSPO, CISPO (its IS-weight cap epsilon_high: 1.1, low enough to bind here, and TRL's default
# 0.2), SAPO, VESPO.
NEW_LOSS_CASES = [
    dict(loss_type="grpo", importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4, beta=0.0),
    dict(loss_type="luspo", importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4, beta=0.04,
         use_bias_correction_kl=False),
    dict(loss_type="cispo", epsilon_high=1.1, beta=0.0),
    dict(loss_type="cispo", beta=0.0),  # TRL's default cap: epsilon_high = epsilon = 0.2, below 1
    dict(loss_type="sapo", beta=0.04, use_bias_correction_kl=False),
    dict(loss_type="vespo", beta=0.0),
]
CASES += NEW_LOSS_CASES


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_parity_with_grpo_trainer(case, model_dir, tmp_path, monkeypatch):
    _parity(case, model_dir, tmp_path, monkeypatch)


def test_parity_with_a_softcapped_gemma2_head(tmp_path, monkeypatch):
    """A tiny Gemma-2 whose final_logit_softcapping (2.0) bends its logits: dk gets the cap from the config and
    trains as GRPOTrainer does (which applies the same cap in its own fused head)."""
    from transformers import AutoModelForCausalLM

    folder = H.save_tiny_model(str(tmp_path / "gemma2"), arch="gemma2")
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert dktrl.model_head(model) == dict(softcap=2.0, logit_scale=1.0)
    ids = torch.arange(2, 30)[None]
    with torch.no_grad():
        h = model.get_decoder()(input_ids=ids).last_hidden_state[0, :-1]
    w, t = model.lm_head.weight, ids[0, 1:]
    capped, plain = dk.linear_logprob(h, w, t, softcap=2.0), dk.linear_logprob(h, w, t)
    assert float((capped - plain).abs().max()) > 0.1  # the cap matters for this model
    # Measured: 1.6e-5 worst (a post-feedforward norm weight: Gemma's norms are zero-initialised (1 + w), so that
    # tensor is only its 3 updates and its relative difference is one of the update), 1.1e-5 for o_proj; the
    # Llama cases stay under 5.6e-6. One step's gradients of the capped head agree with the float64 truth to 1.1e-6
    # for dk and for TRL's own kernel alike, so this is fp32 noise carried through 3 Adam steps (the model moves
    # 14%), not a difference in the math: the bound here is 3e-5, not TOL.
    _parity(dict(loss_type="grpo", beta=0.04, epsilon_high=0.28, delta=1.5, use_bias_correction_kl=False), folder,
            tmp_path, monkeypatch, tol=3e-5)


def test_a_head_dk_cannot_reproduce_is_refused(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.config.final_logit_softcapping = 0.05  # the config says capped; the Llama forward does not cap
    with pytest.raises(NotImplementedError, match="cannot reproduce"):
        dktrl.model_head(model)


def _parity(case, model_dir, tmp_path, monkeypatch, tol=TOL):
    kw = {**PARITY_ARGS, **case}
    ref = _train(GRPOTrainer, model_dir, str(tmp_path / "trl"), **kw)
    p0 = _params(ref)
    ref.train()

    import trl.trainer.utils as trl_utils
    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", _NoTRLKernel)
    dph = _train(dktrl.DPHGRPOTrainer, model_dir, str(tmp_path / "dph"), **kw)
    fallback = case["beta"] != 0 and case.get("use_bias_correction_kl", True)
    assert dph._dk_fallback == (["use_bias_correction_kl"] if fallback else [])
    calls = {"head_in_loss": 0, "head_outside": 0, "dk_loss": 0, "in_loss": False}
    head = dph.model.get_output_embeddings()
    head.register_forward_hook(lambda *a: calls.__setitem__(
        "head_in_loss" if calls["in_loss"] else "head_outside",
        calls["head_in_loss" if calls["in_loss"] else "head_outside"] + 1))
    dph.dph_loss.register_forward_hook(lambda *a: calls.__setitem__("dk_loss", calls["dk_loss"] + 1))
    inner = dph._compute_loss

    def spy(model, inputs):
        calls["in_loss"] = True
        try:
            return inner(model, inputs)
        finally:
            calls["in_loss"] = False

    dph._compute_loss = spy
    dph.train()

    assert calls["head_in_loss"] == 0, "lm_head's forward ran in the loss path"
    assert calls["head_outside"] > 0, "the hook never fired at all (generation calls lm_head): the check is void"
    assert calls["dk_loss"] == (0 if fallback else 3 * 2)  # 3 steps x 2 micro-batches through dk's fused loss
    a, b = _params(ref), _params(dph)
    moved = torch.cat([(a[n] - p0[n]).flatten() for n in a]).norm() / torch.cat([p0[n].flatten() for n in a]).norm()
    assert moved > 100 * TOL, f"training barely moved the parameters ({moved:.2e}): the parity check is void"
    rel = {n: float((a[n] - b[n]).norm() / a[n].norm()) for n in a}
    worst = max(rel, key=rel.get)
    print(f"parity {case}: moved {moved:.3f}, worst relative difference {rel[worst]:.2e} ({worst})")
    assert rel[worst] <= tol, f"{worst}: relative difference {rel[worst]:.2e} > {tol}"
    # TRL's metrics, same names and values (the last logged step; log_history[-1] is the run summary)
    la, lb = ref.state.log_history[-2], dph.state.log_history[-2]
    per_type = {"cispo": ("cispo_clip_ratio",), "sapo": (), "vespo": ("vespo/phi_seq_mean",)}
    clip = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "clip_ratio/low_min",
            "clip_ratio/high_max")
    for key in ("loss", "entropy") + per_type.get(case["loss_type"], clip) + (("kl",) if case["beta"] else ()):
        assert key in lb, key
        assert lb[key] == pytest.approx(la[key], rel=1e-4, abs=1e-6), key
    if case["beta"] == 0.0:
        assert "kl" not in lb


def test_clip_is_live_in_parity_setup(model_dir, tmp_path):
    """The parity setup clips: the second iteration on a generation batch is off-policy enough."""
    tr = _train(dktrl.DPHGRPOTrainer, model_dir, str(tmp_path / "o"), **PARITY_ARGS, epsilon_high=0.28, delta=1.5,
                max_steps=2)
    tr.train()
    regions = [h["clip_ratio/region_mean"] for h in tr.state.log_history if "clip_ratio/region_mean" in h]
    assert max(regions) > 0.05, regions


# ---------------------------------------------------------------------------------------------------------------
# D_pef
# ---------------------------------------------------------------------------------------------------------------


def _pef_rows(model_dir, n_rows=6, seed=0):
    """Stored 'pi_ref samples' for the tests: completions of varied length, log-probs from the model itself."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = H.make_tokenizer()
    g = torch.Generator().manual_seed(seed)
    prompts = [tok(f"{i}*{i}=?")["input_ids"] for i in range(n_rows)]
    comps = [torch.randint(3, len(tok), (3 + i % 4,), generator=g).tolist() for i in range(n_rows)]
    ref = dktrl.score_completions(model, prompts, comps, tok.pad_token_id)
    # shift the stored log-probs so that u = pi_theta / pi_ref != 1 and the divergence has a gradient
    ref = [[min(x - 0.3 * ((j % 3) - 1), 0.0) for j, x in enumerate(r)] for r in ref]
    return [dict(prompt_ids=p, response_ids=c, ref_logp=r) for p, c, r in zip(prompts, comps, ref)]


def test_pef_rows_get_exactly_the_dk_divergence_loss(model_dir, tmp_path):
    rows = _pef_rows(model_dir)
    tr = _train(dktrl.DPHGRPOTrainer, model_dir, str(tmp_path / "o"), pef_dataset=rows, dph="dph-js",
                pef_per_step=3, max_steps=1)
    caught = []
    inner = tr._compute_loss
    tr._compute_loss = lambda m, i: caught.append((m, i)) or inner(m, i)
    tr.train()
    model, inputs = caught[0]
    pef = inputs[dktrl.PEF_KEY]
    assert len(pef["rows"]) == 3
    # no D_exp contribution: zero advantages (beta = 0) leave exactly the D_pef term
    inputs = {**inputs, "advantages": torch.zeros_like(inputs["advantages"])}
    tr.model.zero_grad()
    loss = tr._compute_loss(model, inputs)
    loss.backward()
    got = {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None}

    # the same rows alone, through an independent path: own padding, position ids, dk's fused loss
    tr.model.zero_grad()
    m = tr.model
    ids, attn, targets, P = dktrl._left_right([r["prompt_ids"] for r in pef["rows"]],
                                              [r["response_ids"] for r in pef["rows"]], 0, torch.device("cpu"))
    hidden = m.model(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0),
                     use_cache=False).last_hidden_state[:, P - 1:P - 1 + targets.shape[1]]
    ref_logp = torch.zeros(targets.shape)
    for i, r in enumerate(pef["rows"]):
        ref_logp[i, :len(r["ref_logp"])] = torch.tensor(r["ref_logp"])
    want = dk.FusedLinearDPHLoss.preset("dph-js")(hidden, m.lm_head.weight, targets, targets != -100,
                                                  torch.ones(len(pef["rows"]), dtype=torch.bool), ref_logp=ref_logp)
    want.loss.backward()
    assert float(loss.detach()) == pytest.approx(float(want.loss.detach()), rel=1e-5)
    assert float(want.loss) > 1e-4  # the divergence is not trivially zero
    for n, g in got.items():
        w = dict(tr.model.named_parameters())[n].grad
        assert float((g - w).norm()) <= 1e-4 * float(w.norm()) + 1e-9, n


def test_pef_schedule_spreads_a_step_over_micro_batches_and_ranks():
    from datasets import Dataset

    ds = Dataset.from_list([dict(prompt_ids=[1], response_ids=[2] * (i + 1), ref_logp=[-1.0] * (i + 1))
                            for i in range(10)])
    s = dktrl._PefSchedule(ds, per_step=4, seed=0, count_rows=False)
    parts = [s.micro_batch(step=0, micro=j, grad_accum=2, rank=r, world=2) for r in range(2) for j in range(2)]
    assert [len(p["rows"]) for p in parts] == [2, 2, 2, 2]
    lens = [len(row["response_ids"]) for p in parts for row in p["rows"]]
    assert parts[0]["normalizer"] == sum(lens[:4]) and parts[2]["normalizer"] == sum(lens[4:])
    assert len(set(lens[:8])) == 8  # 8 distinct rows over the two ranks of one step (10 stored)
    nxt = [len(row["response_ids"]) for j in range(2) for row in s.micro_batch(1, j, 2, 0, 2)["rows"]]
    assert set(lens[:8]) | set(nxt) == set(range(1, 11))  # the first pass covers the set before any repeat


def test_build_pef_dataset_and_presample_folder_train(model_dir, tmp_path):
    """build_pef_dataset -> the dph-train presample format on disk -> pef_dataset=<folder> -> 2 DPH-RL steps."""
    from transformers import AutoModelForCausalLM

    from dph_train.presample import save_presample

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = H.make_tokenizer()
    prompts = H.prompt_dataset(4)
    always = lambda completions, **kw: [1.0] * len(completions)  # noqa: E731  every prompt is near-perfect
    exp_ds, pef_ds = dktrl.build_pef_dataset(model, tok, prompts, always, n=2, max_new_tokens=6)
    assert len(exp_ds) == 0 and len(pef_ds) == 8
    r = pef_ds[0]
    assert len(r["ref_logp"]) == len(r["response_ids"]) and all(x <= 0 for x in r["ref_logp"])
    again = dktrl.score_completions(model, [r["prompt_ids"]], [r["response_ids"]], tok.pad_token_id)[0]
    assert again == pytest.approx(r["ref_logp"], abs=1e-5)
    never = lambda completions, **kw: [0.0] * len(completions)  # noqa: E731
    exp2, pef2 = dktrl.build_pef_dataset(model, tok, prompts, never, n=2, max_new_tokens=6)
    assert len(exp2) == 4 and len(pef2) == 0

    folder = str(tmp_path / "presample")
    save_presample(folder, [dict(id="0", split="pef")], pef_ds.to_list(), {})
    tr = _train(dktrl.DPHGRPOTrainer, model_dir, str(tmp_path / "o"), pef_dataset=folder, dph="dph-f",
                max_steps=2, reward=H.reward_len_parity)
    p0 = _params(tr)
    tr.train()
    logs = [h for h in tr.state.log_history if "dph/divergence_mean" in h]
    assert len(logs) == 2 and all(h["dph/pef_tokens"] > 0 for h in logs)
    assert any(float((p - p0[n]).norm()) > 0 for n, p in tr.model.named_parameters())


def test_bad_arguments_are_named(model_dir, tmp_path):
    rows = [dict(prompt_ids=[3], response_ids=[4, 5], ref_logp=[-1.0])]
    with pytest.raises(ValueError, match="ref_logp"):
        dktrl.load_pef_dataset(rows)
    with pytest.raises(ValueError, match="dph="):
        _train(dktrl.DPHGRPOTrainer, model_dir, str(tmp_path / "a"), pef_dataset=_pef_rows(model_dir, 2))
    with pytest.raises(ValueError, match="top_entropy_quantile < 1"):
        _train(dktrl.DPHGRPOTrainer, model_dir, str(tmp_path / "b"), top_entropy_quantile=0.5,
               pef_dataset=_pef_rows(model_dir, 2), dph="dph-js")
    with pytest.raises(TypeError, match="dph must be"):
        _train(dktrl.DPHGRPOTrainer, model_dir, str(tmp_path / "c"), dph=3)


def test_unsupported_setting_falls_back_to_trl_math_on_dk_logprobs(model_dir, tmp_path, monkeypatch):
    import trl.trainer.utils as trl_utils
    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", _NoTRLKernel)
    tr = _train(dktrl.DPHGRPOTrainer, model_dir, str(tmp_path / "o"), top_entropy_quantile=0.5, max_steps=1)
    assert tr._dk_fallback == ["top_entropy_quantile < 1"]
    tr.train()  # TRL's loss with an entropy mask, with every log-prob from dk (TRL's kernel would raise)


@pytest.mark.parametrize("case", NEW_LOSS_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_dph_rl_trains_with_every_loss_type(case, model_dir, tmp_path):
    """pef_dataset + dph="dph-js" with each newer loss type: D_pef rows get the divergence, D_exp rows the loss."""
    tr = _train(dktrl.DPHGRPOTrainer, model_dir, str(tmp_path / "o"), pef_dataset=_pef_rows(model_dir, 4),
                dph="dph-js", max_steps=2, reward=H.reward_len_parity, **case)
    assert tr._dk_fallback == [] and tr.dph_loss.cfg["divergence"] == "js"
    p0 = _params(tr)
    tr.train()
    logs = [h for h in tr.state.log_history if "dph/divergence_mean" in h]
    assert len(logs) == 2 and all(h["dph/pef_tokens"] > 0 for h in logs)
    assert any(float((p - p0[n]).norm()) > 0 for n, p in tr.model.named_parameters())


def test_dph_kernels_imports_without_trl():
    code = ("import sys; sys.modules['trl'] = None; import dph_kernels, dph_kernels.integrations.trl as t\n"
            "try:\n    t.DPHGRPOTrainer\nexcept ImportError as e:\n    print('ok', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("ok") and "dph[trl]" in out.stdout, out.stderr


# ---------------------------------------------------------------------------------------------------------------
# 2 processes
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ddp_two_processes_train_and_stay_in_sync(model_dir, tmp_path):
    worker = os.path.join(os.path.dirname(__file__), "trl_ddp_worker.py")
    out = tmp_path / "ddp.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(__file__)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", worker,
           model_dir, str(tmp_path / "run"), str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["world_size"] == 2 and rep["backend"] == "gloo"
    assert rep["max_param_diff_across_ranks"] == 0.0
    assert rep["moved"] > 1e-3
    assert rep["pef_rows_rank0"] != rep["pef_rows_rank1"]  # each rank trained on its own stored samples
    assert rep["steps"] == 2 and rep["dph_loss_calls"] == [2, 2]


LOSS_MATH_CASES = [dict(loss_type=lt, beta=0.04, use_bias_correction_kl=False, epsilon_high=0.28, delta=1.5)
                   for lt in ("grpo", "bnpo", "dr_grpo", "dapo")] + NEW_LOSS_CASES


@pytest.mark.parametrize("case", LOSS_MATH_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_dk_loss_equals_trl_loss_math_on_one_micro_batch(case, model_dir, tmp_path):
    """The loss math alone: on the same micro-batch (off-policy, clipped), with the same (dk) log-probs, dk's fused
    loss and TRL's own _compute_loss (the real package) give the same value and gradients, for every loss type."""
    tr = _train(dktrl.DPHGRPOTrainer, model_dir, str(tmp_path / "o"), **PARITY_ARGS, **case, max_steps=2)
    caught = []
    inner = tr._compute_loss
    tr._compute_loss = lambda m, i: caught.append((m, i)) or inner(m, i)
    tr.train()
    model, inputs = caught[-1]  # the second iteration on its generation batch: ratio != 1
    assert inputs.get("old_per_token_logps") is not None

    def loss_and_grads(fn):
        tr.model.zero_grad()
        loss = fn(model, inputs)
        loss.backward()
        return float(loss.detach()), [p.grad.clone() for p in tr.model.parameters()]

    l_dk, g_dk = loss_and_grads(inner)
    l_trl, g_trl = loss_and_grads(lambda m, i: GRPOTrainer._compute_loss(tr, m, i))
    assert l_dk == pytest.approx(l_trl, rel=1e-6, abs=1e-8)
    for a, b in zip(g_dk, g_trl):
        assert float((a - b).norm()) <= 1e-5 * float(b.norm()) + 1e-10
