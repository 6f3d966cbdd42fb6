"""The training step on the tiny random-init Llama: lm_head's forward is never called (no logits), the micro-batch
normalizer makes gradient accumulation exact, and the data order is a pure function of the step."""
import pytest
import torch

pytest.importorskip("transformers")

from dph_train.batching import Seq, score_sequences  # noqa: E402
from dph_train.common import RunDir, encode_prompt  # noqa: E402
from dph_train.config import Config, ModelConfig  # noqa: E402
from dph_train.models import load_model  # noqa: E402
from dph_train.rollout import HFEngine  # noqa: E402
from dph_train.testing import ParityTask, ReplayEngine  # noqa: E402
from dph_train.trainer import Trainer, make_ref_model  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = Config()
    cfg.model = ModelConfig(name="tiny", gradient_checkpointing=True)
    cfg.rollout.max_new_tokens = 6
    cfg.train.prompts_per_step, cfg.train.group_size, cfg.train.pef_per_step = 2, 4, 3
    cfg.train.micro_batch_size = 3
    model, tok = load_model(cfg.model, "cpu", verbose=False)
    task = ParityTask(n_train=6, n_test=2, n_ood=2)
    exs = task.examples("train")
    prompts = [encode_prompt(tok, ex.prompt, cfg.task) for ex in exs]
    eng = HFEngine(model, tok, cfg.rollout, cfg.model, torch.device("cpu"))
    torch.manual_seed(0)
    rb = eng.generate(prompts, n=4, desc=False)  # enough rollouts for a few steps, generated before any hook
    pef_p = [rb.prompt_list(i) for i in range(3)]
    pef_r = [rb.response_list(i) for i in range(3)]
    ref = score_sequences(model, pef_p, pef_r, tok.pad_token_id, cfg.model, torch.device("cpu"))
    pef_rows = [dict(example_id=exs[0].id, prompt_ids=p, response_ids=r, ref_logp=lp) for p, r, lp in
                zip(pef_p, pef_r, ref)]
    rows = [dict(id=ex.id, split="pef" if i == 0 else "exp") for i, ex in enumerate(exs)]
    run = RunDir(str(tmp_path_factory.mktemp("run")))
    return cfg, model, tok, task, rb, rows, pef_rows, run


def _replay_batches(rb, n_batches):
    """Split the pre-generated rollouts into per-step batches of 2 prompts x 4 (rows are grouped by prompt)."""
    from dph_train.rollout import RolloutBatch

    out = []
    for b in range(n_batches):
        idx = range(8 * b, 8 * b + 8)
        out.append(RolloutBatch.from_lists([rb.prompt_list(i) for i in idx], [rb.response_list(i) for i in idx],
                                           [rb.texts[i] for i in idx], [rb.finished[i] for i in idx], 2))
    return out


@pytest.mark.parametrize("method,old_logp", [("dph-js", "recompute"), ("dph-f", "on_policy"), ("rkl", "recompute"),
                                             ("grpo", "on_policy")])
def test_training_step_never_calls_lm_head(setup, method, old_logp):
    cfg, model, tok, task, rb, rows, pef_rows, run = setup
    cfg.train.method, cfg.train.old_logp = method, old_logp
    ref = make_ref_model(model) if method == "rkl" else None
    trainer = Trainer(cfg, model, tok, task, ReplayEngine(_replay_batches(rb, 2)), run, torch.device("cpu"), rows,
                      pef_rows, ref_model=ref)
    calls = []

    def forbid(mod, inp, out):
        calls.append(tuple(inp[0].shape))
        raise AssertionError("lm_head.forward was called: the loss path must hand lm_head.weight to the kernel")

    handles = [m.lm_head.register_forward_hook(forbid) for m in ([model] + ([ref] if ref is not None else []))]
    head_grads = []  # read just before the optimizer step: the loop frees the gradients after it
    handles.append(trainer.opt.register_step_pre_hook(
        lambda opt, a, k: head_grads.append(None if model.lm_head.weight.grad is None
                                            else float(model.lm_head.weight.grad.abs().sum()))))
    try:
        before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
        rec = trainer.train_step()
        rec2 = trainer.train_step()
    finally:
        for h in handles:
            h.remove()
    assert calls == []
    assert rec["step"] == 1 and rec2["step"] == 2
    dph = method.startswith("dph")
    assert rec["n_exp_seqs"] == 8 and rec["n_pef_seqs"] == (3 if dph else 0)
    assert (rec["pef_tokens"] > 0) == dph
    assert rec["grad_norm"] > 0 and rec["entropy"] is not None and rec["entropy"] > 0
    # the head's weight (tied with the embedding) gets its gradient through the fused kernel
    assert head_grads and all(g is not None and g > 0 for g in head_grads)
    assert all(p.grad is None for p in model.parameters())  # freed after the step
    assert not torch.equal(before, model.model.layers[0].mlp.up_proj.weight)
    if method == "rkl":
        assert "kl_penalty_mean" in rec


def test_micro_batching_with_global_normalizer_equals_one_batch(setup):
    cfg, model, tok, task, rb, rows, pef_rows, run = setup
    cfg.train.method, cfg.train.old_logp = "dph-js", "recompute"
    trainer = Trainer(cfg, model, tok, task, ReplayEngine([]), run, torch.device("cpu"), rows, pef_rows)
    exp = [Seq(rb.prompt_list(i), rb.response_list(i), advantage=float((-1) ** i) * (1 + i / 10)) for i in range(8)]
    pef = [Seq(r["prompt_ids"], r["response_ids"], is_pef=True, ref_logp=[v - 0.3 for v in r["ref_logp"]])
           for r in pef_rows]
    trainer._fill_logps(exp)
    for s in exp:  # an off-policy old log-prob so that the ratio clip binds somewhere
        s.old_logp = [v + 0.25 * ((-1) ** j) for j, v in enumerate(s.old_logp)]
    grads = []
    for mbs in (100, 2):
        cfg.train.micro_batch_size = mbs
        model.zero_grad(set_to_none=True)
        n = {"exp": float(sum(s.n_tokens for s in exp)), "pef": float(sum(s.n_tokens for s in pef))}
        total = 0.0
        for group in (exp, pef):
            for i in range(0, len(group), mbs):
                out = trainer._micro_loss(group[i:i + mbs], n)
                out.loss.backward()
                total += float(out.loss.detach())
        grads.append((total, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    cfg.train.micro_batch_size = 3
    (l1, g1), (l2, g2) = grads
    assert abs(l1 - l2) < 1e-5
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    model.zero_grad(set_to_none=True)


def test_data_order_covers_each_prompt_once_per_epoch(setup):
    cfg, model, tok, task, rb, rows, pef_rows, run = setup
    cfg.train.method = "dph-js"
    trainer = Trainer(cfg, model, tok, task, ReplayEngine([]), run, torch.device("cpu"), rows, pef_rows)
    n = len(trainer.exp_examples)  # 5 D_exp prompts (one is D_pef)
    assert n == 5
    seen = [i for step in range(5) for i in trainer._take(n, 2, step, salt=1)]  # 10 draws = 2 epochs
    assert sorted(seen[:5]) == list(range(5)) and sorted(seen[5:]) == list(range(5))
    assert trainer._take(n, 2, 3, salt=1) == trainer._take(n, 2, 3, salt=1)  # a pure function of the step
    # baselines explore on every prompt and use no stored samples
    cfg.train.method = "dapo"
    base = Trainer(cfg, model, tok, task, ReplayEngine([]), run, torch.device("cpu"), rows, pef_rows)
    assert len(base.exp_examples) == 6 and base.pef_rows == []
    cfg.train.method = "dph-js"
