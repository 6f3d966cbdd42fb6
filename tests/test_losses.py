"""RL losses: elementwise pieces, the fused hybrid module, statistics of the generators, gradient accumulation."""
import itertools
import math

import pytest
import torch

import dph_kernels as dk
from dph_kernels import reference as ref
from numerics import assert_contract

pytestmark = pytest.mark.gpu  # on a CUDA machine `pytest -m gpu` runs these with the Triton kernels on the GPU
KINDS = list(dk.DIVERGENCES)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def on(impl):
    """Where an impl's inputs live: the GPU for Triton when there is one (else the interpreter), the CPU otherwise."""
    return DEVICE if impl == "triton" else "cpu"


# ----------------------------------------------------------------------------------------------- elementwise pieces
@pytest.mark.parametrize("kind", KINDS)
def test_generator_slope_is_its_derivative(kind):
    # f_generator_parts' closed-form slope d(w f(e^r))/dr against autograd of the value, weighted and not
    g = torch.Generator().manual_seed(KINDS.index(kind))
    r = torch.cat([torch.randn(500, generator=g, dtype=torch.float64) * 4, torch.tensor([0.0, 1e-9, -1e-9, 30.0],
                                                                                          dtype=torch.float64)])
    for lw in (None, -torch.rand(r.shape, generator=g, dtype=torch.float64) * 12):
        x = r.clone().requires_grad_()
        value, slope = ref.f_generator_parts(x, kind, 0.3, log_weight=lw)
        (auto,) = torch.autograd.grad(value().sum(), x)
        assert torch.allclose(slope().detach(), auto, rtol=1e-12, atol=1e-12), kind


@pytest.mark.parametrize("kind", KINDS)
def test_generator_against_float64_and_safe_at_50(kind):
    r = torch.cat([torch.linspace(-50, 50, 2001), torch.tensor([0.0, 1e-7, -1e-7])])
    x64 = r.double().requires_grad_()
    truth = ref.f_generator(x64, kind, 0.3)
    (g64,) = torch.autograd.grad(truth.sum(), x64)
    x32 = r.clone().requires_grad_()
    val = dk.f_divergence(x32, kind, alpha=0.3)
    (g32,) = torch.autograd.grad(val.sum(), x32)
    assert torch.isfinite(val).all() and torch.isfinite(g32).all(), kind
    # relative to the magnitude (values reach e^50)
    scale = truth.detach().abs().clamp_min(1.0)
    assert float(((val.double() - truth.detach()) / scale).abs().max()) < 1e-5
    gscale = g64.abs().clamp_min(1.0)
    assert float(((g32.double() - g64) / gscale).abs().max()) < 1e-5
    # f(1) = 0 and f >= 0 for every kind except the plain k1 form
    assert abs(float(dk.f_divergence(torch.zeros(1), kind, alpha=0.3))) < 1e-7
    if kind != "fkl_k1":
        assert (val >= -1e-6).all()


def test_generator_clamp_and_errors():
    r = torch.tensor([-30.0, 0.0, 30.0], requires_grad=True)
    g = dk.f_divergence(r, "fkl", clamp=(-10, 10))
    assert float(g.max()) == 10.0
    g.sum().backward()
    assert r.grad[2] == 0 and r.grad[0] == 0  # clamped: no gradient
    with pytest.raises(ValueError, match="kind"):
        dk.f_divergence(r, "kl")
    with pytest.raises(ValueError, match="alpha"):
        dk.f_divergence(r, "alpha", alpha=1.0)


def test_kl_estimators():
    lp, rl = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -1.0, -0.5])
    d = lp - rl
    assert torch.allclose(dk.kl_penalty(lp, rl, "k1"), d)
    assert torch.allclose(dk.kl_penalty(lp, rl, "k2"), 0.5 * d**2)
    assert torch.allclose(dk.kl_penalty(lp, rl, "k3"), torch.exp(-d) + d - 1)
    assert torch.allclose(dk.kl_penalty(lp, rl, "abs"), d.abs())
    with pytest.raises(ValueError, match="estimator"):
        dk.kl_penalty(lp, rl, "k4")


def test_grpo_advantages_unbiased_std():
    r = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    a = dk.grpo_advantages(r, 4)
    g = r[:4]
    assert torch.allclose(a[:4], (g - g.mean()) / (g.std(unbiased=True) + 1e-6))
    assert torch.all(a[4:] == 0)  # a constant group has no signal
    with pytest.raises(ValueError, match="group_size"):
        dk.grpo_advantages(r, 3)


def test_ppo_clip_loss_values_and_metrics():
    logp = torch.log(torch.tensor([[0.5, 0.5, 0.5, 0.5]]))
    old = torch.log(torch.tensor([[0.5, 0.25, 1.0, 0.1]]))  # ratios 1, 2, 0.5, 5
    for adv, expect in [(1.0, [-1, -1.28, -0.5, -1.28]), (-1.0, [1, 2, 0.8, 3.0])]:
        loss, m = dk.ppo_clip_loss(logp.clone().requires_grad_(), old, torch.tensor([adv]), torch.ones(1, 4),
                                   clip_low=0.2, clip_high=0.28, dual_clip=3.0, loss_agg="token-mean")
        assert loss.item() == pytest.approx(sum(expect) / 4, rel=1e-6)
    assert m["clipfrac_low"] == 0.25 and m["clipfrac_high"] == 0.0 and m["clipfrac_dual"] == 0.25


@pytest.mark.parametrize("mode", dk.AGG_MODES)
def test_aggregate_modes(mode):
    v = torch.arange(12.0).reshape(3, 4)
    m = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    got = dk.aggregate(v, m, mode)
    rows = [v[0, :2], v[1]]
    expect = {
        "token-mean": (v[0, :2].sum() + v[1].sum()) / 6,
        "seq-mean-token-mean": sum(r.mean() for r in rows) / 2,
        "seq-mean-token-sum": sum(r.sum() for r in rows) / 2,
        "seq-mean-token-sum-norm": sum(r.sum() for r in rows) / (2 * 4),
    }[mode]
    assert float(got) == pytest.approx(float(expect))
    assert float(dk.aggregate(v, torch.zeros_like(m), mode)) == 0.0  # nothing selected: zero, not NaN


# ------------------------------------------------------------------------------------------------- the fused module
def make_batch(B=5, T=9, D=24, V=131, seed=0, dtype=torch.float32, n_pef=2):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g).to(dtype)
    weight = (torch.randn(V, D, generator=g) / math.sqrt(D) * 2).to(dtype)
    targets = torch.randint(0, V, (B, T), generator=g)
    loss_mask = torch.rand(B, T, generator=g) > 0.2
    loss_mask[:, 0] = True
    is_pef = torch.zeros(B, dtype=torch.bool)
    is_pef[:n_pef] = True
    with torch.no_grad():
        lp = ref.linear_logprob(hidden.double(), weight.double(), targets).float()
    # ratios on both sides of the clip range; stored log-probs are <= 0 (the fused loss refuses others)
    old = (lp + 0.4 * torch.randn(B, T, generator=g)).clamp(max=0.0)
    ref_logp = (lp + 0.8 * torch.randn(B, T, generator=g)).clamp(max=0.0)
    online_ref = (lp + 0.3 * torch.randn(B, T, generator=g)).clamp(max=0.0)
    adv = torch.randn(B, generator=g)
    return dict(hidden=hidden, weight=weight, targets=targets, loss_mask=loss_mask, is_pef=is_pef, old=old,
                ref=ref_logp, online_ref=online_ref, adv=adv)


def composed_reference(b, cfg, dtype=torch.float64, hidden=None, weight=None, normalizer=None):
    """The hybrid loss composed from reference pieces on materialized logits."""
    h = b["hidden"].to(dtype) if hidden is None else hidden
    w = b["weight"].to(dtype) if weight is None else weight
    tok = b["loss_mask"]
    tok_exp, tok_pef = tok & ~b["is_pef"][:, None], tok & b["is_pef"][:, None]
    tgt = torch.where(tok, b["targets"], torch.full_like(b["targets"], -100))
    logp, ent = ref.linear_logprob(h, w, tgt, None, cfg["temperature"], -100, True, cfg.get("softcap"),
                                   cfg.get("logit_scale", 1.0))
    ct = logp.dtype
    loss_t, ratio, lo, hi, dual = ref.policy_token_loss(logp, b["old"].to(ct), b["adv"].to(ct)[:, None], cfg, tok_exp)
    if cfg["kl_beta"]:
        loss_t = loss_t + cfg["kl_beta"] * ref.kl_estimate(logp, b["online_ref"].to(ct), cfg["kl_estimator"])
    loss_t = loss_t - cfg["entropy_coef"] * ent
    n_exp, n_pef = (None, None) if normalizer is None else (normalizer["exp"], normalizer["pef"])
    L = ref.aggregate(loss_t, tok_exp, cfg["loss_agg"], n_exp)
    div = None
    if cfg["divergence"]:
        div = ref.f_generator(logp - b["ref"].to(ct), cfg["divergence"], cfg["alpha"])
        if cfg["divergence_clamp"]:
            div = torch.clamp(div, *cfg["divergence_clamp"])
        L = L + cfg["eta"] * ref.aggregate(div, tok_pef, cfg["loss_agg"], n_pef)
    return L, dict(ratio=ratio, lo=lo, hi=hi, dual=dual, div=div, ent=ent, tok_exp=tok_exp, tok_pef=tok_pef)


def run_fused(b, loss_fn, dtype=torch.float32, normalizer=None):
    h = b["hidden"].to(dtype).requires_grad_()
    w = b["weight"].to(dtype).requires_grad_()
    d = on(loss_fn.cfg["impl"])
    out = loss_fn(h.to(d), w.to(d), *(b[k].to(d) for k in ("targets", "loss_mask", "is_pef")),
                  advantages=b["adv"].to(d), old_logp=b["old"].to(d), ref_logp=b["ref"].to(d),
                  online_ref_logp=b["online_ref"].to(d), normalizer=normalizer)
    dh, dw = torch.autograd.grad(out.loss, [h, w])
    out.loss, out.logp = out.loss.cpu(), out.logp.cpu()
    return out, dh, dw


def run_composed(b, cfg, dtype):
    h = b["hidden"].to(dtype).requires_grad_()
    w = b["weight"].to(dtype).requires_grad_()
    L, aux = composed_reference(b, cfg, dtype, h, w)
    dh, dw = torch.autograd.grad(L, [h, w])
    return L, dh, dw, aux


# Every (impl, aggregation, divergence) combination; dual clip, entropy, KL penalty and temperature vary with it.
CASES = [(impl, agg, kind, i) for i, (impl, agg, kind) in
         enumerate(itertools.product(["torch", "triton"], dk.AGG_MODES, KINDS))]


@pytest.mark.parametrize("impl, agg, kind, i", CASES)
def test_fused_matches_composed_reference(impl, agg, kind, i):
    cfg = dict(divergence=kind, eta=0.3, alpha=0.4, clip_low=0.2, clip_high=0.28,
               dual_clip=3.0 if i % 2 == 0 else None, kl_beta=0.05 if i % 3 == 0 else 0.0,
               kl_estimator=dk.KL_ESTIMATORS[i % 4], entropy_coef=0.01 if i % 4 in (1, 2) else 0.0,
               loss_agg=agg, temperature=0.8 if i % 5 else 1.0, divergence_clamp=(-3.0, 3.0) if i % 7 == 0 else None,
               softcap=(None, 30.0, 5.0)[i % 3], logit_scale=(1.0, 0.5)[(i // 3) % 2])
    b = make_batch(seed=i)
    loss_fn = dk.FusedLinearDPHLoss(**cfg, impl=impl, log_entropy=True)
    out, dh, dw = run_fused(b, loss_fn)
    L32, dh32, dw32, _ = run_composed(b, cfg, torch.float32)
    L64, dh64, dw64, aux = run_composed(b, cfg, torch.float64)
    for name, k, s, t in [("loss", out.loss.detach(), L32.detach(), L64.detach()), ("dH", dh, dh32, dh64),
                          ("dW", dw, dw32, dw64)]:
        assert_contract(f"{impl} {agg} {kind} {name}", k, s, t, torch.float32)
    m = out.metrics
    te, tp = aux["tok_exp"], aux["tok_pef"]
    assert m["n_tokens_exp"] == int(te.sum()) and m["n_tokens_pef"] == int(tp.sum())
    assert m["n_seqs_exp"] == 3 and m["n_seqs_pef"] == 2
    assert m["clipfrac_low"] == pytest.approx(float(aux["lo"][te].float().mean()), abs=1e-6)
    assert m["clipfrac_high"] == pytest.approx(float(aux["hi"][te].float().mean()), abs=1e-6)
    assert m["clipfrac_dual"] == pytest.approx(float(aux["dual"][te].float().mean()), abs=1e-6)
    assert m["ratio_mean"] == pytest.approx(float(aux["ratio"][te].mean()), rel=1e-5)
    assert m["divergence_mean"] == pytest.approx(float(aux["div"][tp].mean()), rel=1e-4, abs=1e-6)
    assert m["divergence_max"] == pytest.approx(float(aux["div"][tp].max()), rel=1e-4, abs=1e-6)
    assert m["entropy_mean"] == pytest.approx(float(aux["ent"][te | tp].mean()), rel=1e-5)
    assert m["loss"] == pytest.approx(float(L64), rel=1e-4, abs=1e-6)
    assert torch.allclose(out.logp, ref.linear_logprob(b["hidden"], b["weight"],
                          torch.where(b["loss_mask"], b["targets"], -100), temperature=cfg["temperature"],
                                          softcap=cfg["softcap"], logit_scale=cfg["logit_scale"]),
                          atol=1e-5)


# The newer policy losses (reference.POLICY_LOSSES, TRL 1.16's definitions), with D_pef rows mixed in: GSPO (PPO on
# the sequence's mean log-ratio), LUSPO (the same, summed per sequence), CISPO, SAPO, VESPO. The torch path takes the
# one-pass chunked loss for the token-level ones and the two-pass route for the rest.
POLICY_CASES = [
    dict(policy_loss="ppo", importance_sampling_level="sequence", loss_agg="seq-mean-token-mean", clip_low=0.05,
         clip_high=0.08),
    dict(policy_loss="ppo", importance_sampling_level="sequence", loss_agg="seq-mean-token-sum", kl_beta=0.05),
    dict(policy_loss="cispo", loss_agg="token-mean", clip_high=0.3),
    dict(policy_loss="cispo", loss_agg="token-mean", cispo_max_weight=0.5),
    dict(policy_loss="sapo", loss_agg="seq-mean-token-mean", sapo_temperature_pos=1.0, sapo_temperature_neg=1.05),
    dict(policy_loss="vespo", loss_agg="token-mean"),
]


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("case", POLICY_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_fused_policy_losses_match_composed_reference(impl, case):
    full = dict(divergence="js", eta=0.3, alpha=0.5, clip_low=0.2, clip_high=0.28, dual_clip=None, kl_beta=0.0,
                kl_estimator="k3", entropy_coef=0.0, temperature=1.0, divergence_clamp=None, policy_loss="ppo",
                importance_sampling_level="token", sapo_temperature_pos=1.0, sapo_temperature_neg=1.05,
                vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0, cispo_max_weight=None)
    cfg = {**full, **case}
    b = make_batch(seed=7)
    loss_fn = dk.FusedLinearDPHLoss(**cfg, impl=impl)
    out, dh, dw = run_fused(b, loss_fn)
    L32, dh32, dw32, _ = run_composed(b, cfg, torch.float32)
    L64, dh64, dw64, _ = run_composed(b, cfg, torch.float64)
    assert float(dh64.abs().max()) > 0 and float(L64) != 0
    for name, k, s32, t in [("loss", out.loss.detach(), L32.detach(), L64.detach()), ("dH", dh, dh32, dh64),
                            ("dW", dw, dw32, dw64)]:
        assert_contract(f"{impl} {case} {name}", k, s32, t, torch.float32)


def test_bad_policy_loss_arguments():
    with pytest.raises(ValueError, match="policy_loss"):
        dk.FusedLinearDPHLoss(policy_loss="gspo")
    with pytest.raises(ValueError, match="importance_sampling_level"):
        dk.FusedLinearDPHLoss(importance_sampling_level="seq")
    with pytest.raises(ValueError, match="sapo_temperature_neg"):
        dk.FusedLinearDPHLoss(policy_loss="sapo", sapo_temperature_neg=0.0)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=str)
def test_fused_bf16(impl, dtype):
    cfg = dict(dk.PRESETS["dph-js"])
    full = dict(eta=0.2, alpha=0.5, kl_beta=0.0, kl_estimator="k3", entropy_coef=0.0, loss_agg="token-mean",
                temperature=1.0, divergence_clamp=None)
    full.update(cfg)
    b = make_batch(seed=11)
    out, dh, dw = run_fused(b, dk.FusedLinearDPHLoss(**cfg, impl=impl), dtype)
    Ls, dhs, dws, _ = run_composed(b, full, dtype)
    L64, dh64, dw64, _ = run_composed(b, full, torch.float64)
    for name, k, s, t in [("loss", out.loss.detach(), Ls.detach(), L64.detach()), ("dH", dh, dhs, dh64),
                          ("dW", dw, dws, dw64)]:
        assert_contract(f"{impl} bf16 {name}", k, s, t, dtype)


@pytest.mark.parametrize("n_pef", [0, 5])
def test_all_exp_or_all_pef_batches(n_pef):
    b = make_batch(n_pef=n_pef, seed=3)
    loss_fn = dk.FusedLinearDPHLoss.preset("dph-js")
    out, dh, dw = run_fused(b, loss_fn)
    assert torch.isfinite(out.loss) and torch.isfinite(dh).all()
    assert (out.metrics["n_tokens_pef"] == 0) == (n_pef == 0)


def test_on_policy_ratio_is_one():
    b = make_batch(seed=4, n_pef=0)
    h = b["hidden"].requires_grad_()
    loss_fn = dk.FusedLinearDPHLoss.preset("grpo")
    out = loss_fn(h, b["weight"], b["targets"], b["loss_mask"], b["is_pef"], advantages=b["adv"])
    assert out.metrics["ratio_mean"] == 1.0 and out.metrics["clipfrac_low"] == 0.0
    # on-policy gradient = gradient of -A * logp (token-mean)
    out.loss.backward()
    h2 = b["hidden"].detach().clone().requires_grad_()
    lp = dk.linear_logprob(h2, b["weight"], torch.where(b["loss_mask"], b["targets"], -100))
    (-(b["adv"][:, None] * lp)[b["loss_mask"]].sum() / b["loss_mask"].sum()).backward()
    assert torch.allclose(h.grad, h2.grad, atol=1e-6)


def test_presets():
    assert set(dk.PRESETS) == {"grpo", "dapo", "kl-k3", "rkl-k2", "rkl", "dph-f", "dph-js", "dph-rkl", "alpha"}
    assert dk.PRESETS["rkl"] == dk.PRESETS["kl-k3"]  # the paper's label for the k3 penalty, kept reachable
    assert dk.PRESETS["rkl-k2"]["kl_estimator"] == "k2" and dk.PRESETS["dph-rkl"]["divergence"] == "rkl"
    assert dk.FusedLinearDPHLoss.preset("dph-js").cfg["divergence"] == "js"
    assert dk.FusedLinearDPHLoss.preset("dph-js", eta=0.1).cfg["eta"] == 0.1
    assert dk.FusedLinearDPHLoss.preset("rkl").cfg["kl_beta"] == 0.01
    assert dk.FusedLinearDPHLoss.preset("grpo").cfg["clip_high"] == 0.2
    with pytest.raises(ValueError, match="preset"):
        dk.FusedLinearDPHLoss.preset("ppo2")


def test_padding_garbage_never_reaches_loss_or_grad():
    b = make_batch(seed=6)
    pad = ~b["loss_mask"]
    b["old"] = torch.where(pad, torch.full_like(b["old"], float("nan")), b["old"])
    b["ref"] = torch.where(pad, torch.full_like(b["ref"], -float("inf")), b["ref"])
    out, dh, dw = run_fused(b, dk.FusedLinearDPHLoss.preset("dph-f"))
    assert torch.isfinite(out.loss) and torch.isfinite(dh).all() and torch.isfinite(dw).all()


def test_missing_inputs_and_empty_masks():
    b = make_batch(seed=7)
    f = dk.FusedLinearDPHLoss.preset("dph-js")
    args = (b["hidden"], b["weight"], b["targets"], b["loss_mask"], b["is_pef"])
    with pytest.raises(ValueError, match="advantages"):
        f(*args, ref_logp=b["ref"])
    with pytest.raises(ValueError, match="ref_logp"):
        f(*args, advantages=b["adv"])
    with pytest.raises(ValueError, match="online_ref_logp"):
        dk.FusedLinearDPHLoss.preset("rkl")(b["hidden"], b["weight"], b["targets"], b["loss_mask"],
                                            torch.zeros(5, dtype=torch.bool), advantages=b["adv"])
    with pytest.raises(ValueError, match="divergence=None"):
        dk.FusedLinearDPHLoss.preset("grpo")(*args, advantages=b["adv"], ref_logp=b["ref"])
    with pytest.raises(ValueError, match="is_pef"):
        f(b["hidden"], b["weight"], b["targets"], b["loss_mask"], b["is_pef"][:3], advantages=b["adv"])
    with pytest.raises(ValueError, match="old_logp"):
        f(*args, advantages=b["adv"], ref_logp=b["ref"], old_logp=b["old"][:, :3])
    with pytest.raises(ValueError, match="advantages"):
        f(*args, advantages=b["adv"][:2], ref_logp=b["ref"])
    # A mask that selects nothing: a documented zero loss with zero gradients, never NaN.
    h = b["hidden"].clone().requires_grad_()
    out = f(h, b["weight"], b["targets"], torch.zeros_like(b["loss_mask"]), b["is_pef"])
    out.loss.backward()
    assert out.loss.item() == 0.0 and torch.all(h.grad == 0)


# ---------------------------------------------------------------------------------------- statistics of generators
@pytest.mark.parametrize("kind", KINDS)
def test_sampled_generator_estimates_the_divergence(kind):
    """Mean of f(pi/pi_ref) over samples from pi_ref matches the exact D_f, and its gradient points the same way."""
    torch.manual_seed(0)
    M, alpha = 200_000, 0.3
    theta = torch.tensor([0.3, -0.5, 1.2, 0.0, -1.0, 0.4], dtype=torch.float64, requires_grad=True)
    ref_logits = torch.tensor([0.0, 0.2, 0.9, -0.3, -0.6, 0.8], dtype=torch.float64)
    log_q = torch.log_softmax(ref_logits, 0)
    samples = torch.multinomial(log_q.exp(), M, replacement=True)

    log_p = torch.log_softmax(theta, 0)
    exact = (log_q.exp() * ref.f_generator(log_p - log_q, kind, alpha)).sum()
    g = dk.f_divergence(log_p[samples] - log_q[samples], kind, alpha=alpha)
    est = g.mean()
    sem = float(g.std()) / math.sqrt(M)
    assert abs(float(est) - float(exact)) < 5 * sem + 1e-9, (kind, float(est), float(exact), sem)
    (g_exact,) = torch.autograd.grad(exact, theta, retain_graph=True)
    (g_est,) = torch.autograd.grad(est, theta)
    cos = float(torch.nn.functional.cosine_similarity(g_exact, g_est, dim=0))
    assert cos > 0.98, (kind, cos)


# ----------------------------------------------------------------------------------- gradient accumulation parity
@pytest.mark.parametrize("agg", dk.AGG_MODES)
def test_gradient_accumulation_parity(agg):
    b = make_batch(B=6, n_pef=3, seed=9)
    loss_fn = dk.FusedLinearDPHLoss.preset("dph-js", loss_agg=agg, impl="torch")
    h = b["hidden"].double().requires_grad_()
    w = b["weight"].double().requires_grad_()
    tok = b["loss_mask"]
    exp_rows, pef_rows = ~b["is_pef"], b["is_pef"]

    def counts(rows):
        t = tok & rows[:, None]
        if agg == "token-mean":
            return float(t.sum())
        n = float(t.any(-1).sum())
        return n * tok.shape[1] if agg == "seq-mean-token-sum-norm" else n

    norm = {"exp": counts(exp_rows), "pef": counts(pef_rows)}

    def call(idx, normalizer=None):
        return loss_fn(h[idx], w, b["targets"][idx], tok[idx], b["is_pef"][idx], advantages=b["adv"][idx],
                       old_logp=b["old"][idx], ref_logp=b["ref"][idx], normalizer=normalizer).loss

    full = call(slice(None))
    g_full = torch.autograd.grad(full, [h, w])
    micro = [torch.tensor([0, 3, 4]), torch.tensor([1, 2, 5])]  # each mixes exp and pef rows
    total = sum(call(i, norm) for i in micro)
    g_acc = torch.autograd.grad(total, [h, w])
    assert abs(float(total - full)) < 1e-12
    for a, c in zip(g_acc, g_full):
        assert float((a - c).abs().max()) < 1e-12


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_fused_loss_checks_hidden_once_and_skips_rows_without_loss(impl, monkeypatch):
    # The public entry validates every input once; the internals trust them. Rows with loss_mask 0 never reach a
    # matmul: each logit tile is computed over the loss rows only.
    import sys
    from dph_kernels import _checks
    b = make_batch(B=4, T=10, seed=3)
    b["loss_mask"][:, :5] = False  # a 5-token prompt in every row: 20 of 40 positions carry a loss
    seen = {"hidden": 0}
    check = _checks.check_tensor
    monkeypatch.setattr(_checks, "check_tensor", lambda name, x, **k: seen.__setitem__(name, seen.get(name, 0) + 1)
                        or check(name, x, **k))
    rows = []
    if impl == "torch":
        module = sys.modules["dph_kernels.linear_logprob"]
        tile = module._tile_logits
        monkeypatch.setattr(module, "_tile_logits", lambda h, *a, **k: rows.append(h.shape[0]) or tile(h, *a, **k))
    else:
        from dph_kernels import linear_logprob_triton as tk
        stats, bwd = tk.forward_stats, tk.backward
        monkeypatch.setattr(tk, "forward_stats", lambda h, *a, **k: rows.append(h.shape[0]) or stats(h, *a, **k))
        monkeypatch.setattr(tk, "backward", lambda h, *a, **k: rows.append(h.shape[0]) or bwd(h, *a, **k))
    loss_fn = dk.FusedLinearDPHLoss.preset("dph-js", impl=impl)
    out, dh, dw = run_fused(b, loss_fn)
    assert seen["hidden"] == 1
    assert rows and set(rows) == {int(b["loss_mask"].sum())}
    assert torch.all(dh[:, :5] == 0) and torch.all(out.logp[:, :5] == 0)
    want, _ = composed_reference(b, loss_fn.cfg)
    assert float(out.loss.detach()) == pytest.approx(float(want), rel=1e-5, abs=1e-6)
