"""Exact whole-vocabulary f-divergences between two linear heads."""
import math

import pytest
import torch

import dph_kernels as dk
from dph_kernels import reference as ref
from numerics import assert_contract, run_with_grads

pytestmark = pytest.mark.gpu  # on a CUDA machine `pytest -m gpu` runs these with the Triton kernels on the GPU
KINDS = list(dk.DIVERGENCES)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def on(impl, *xs):
    """Inputs moved where an impl runs: the GPU for Triton when there is one (else the interpreter), else the CPU."""
    d = DEVICE if impl == "triton" else "cpu"
    return [None if x is None else x.to(d) for x in xs]


def make_heads(lead=(3, 7), D=40, Dr=29, V=301, dtype=torch.float32, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*lead, D, generator=g)
    w = torch.randn(V, D, generator=g) / math.sqrt(D) * 2
    rh = torch.randn(*lead, Dr, generator=g)
    rw = torch.randn(V, Dr, generator=g) / math.sqrt(Dr) * 2
    b = torch.randn(V, generator=g) * 0.5 if bias else None
    rb = torch.randn(V, generator=g) * 0.5 if bias else None
    mask = torch.rand(lead, generator=g) > 0.2
    cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    return [cast(x) for x in (h, w, b, rh, rw, rb)], mask


def check(kind, impl, dtype=torch.float32, ref_grad=False, seed=0, temperature=0.9, heads=(None, 1.0, None, 1.0),
          chunk_cols=None):
    softcap, scale, ref_softcap, ref_scale = heads
    (h, w, b, rh, rw, rb), mask = make_heads(dtype=dtype, seed=seed)
    upstream = [torch.randn(mask.shape, generator=torch.Generator().manual_seed(seed + 1))]

    def kernel(*leaves):
        h_, w_, b_, rh_, rw_, rb_, m_ = on(impl, *leaves, mask)
        return dk.linear_f_divergence(h_, w_, rh_, rw_, kind=kind, alpha=0.35, bias=b_, ref_bias=rb_,
                                      temperature=temperature, mask=m_, ref_requires_grad=ref_grad,
                                      impl=impl, softcap=softcap, logit_scale=scale, ref_softcap=ref_softcap,
                                      ref_logit_scale=ref_scale, chunk_cols=chunk_cols).cpu()

    def math_(h_, w_, b_, rh_, rw_, rb_):
        if not ref_grad:
            rh_, rw_, rb_ = rh_.detach(), rw_.detach(), rb_.detach()
        return ref.linear_f_divergence(h_, w_, rh_, rw_, kind, 0.35, b_, rb_, temperature, mask, softcap, scale,
                                       ref_softcap, ref_scale)

    inputs = [h, w, b, rh, rw, rb]
    k_out, k_g = run_with_grads(kernel, inputs, upstream)
    s_out, s_g = run_with_grads(math_, inputs, upstream)
    t_out, t_g = run_with_grads(math_, [x.double() for x in inputs], upstream)
    assert k_out[0].dtype == torch.float32 and k_out[0].shape == mask.shape
    assert_contract(f"{impl} {kind} D", k_out[0], s_out[0], t_out[0], dtype)
    names = ["dh", "dW", "db", "d_ref_h", "d_ref_W", "d_ref_b"]
    for name, k, s, t in list(zip(names, k_g, s_g, t_g))[: 6 if ref_grad else 3]:
        assert_contract(f"{impl} {kind} {name}", k, s, t, dtype)
    if not ref_grad:
        assert all(float(x.abs().max()) == 0 for x in k_g[3:])


@pytest.mark.parametrize("impl", ["torch", "triton", "reference"])
@pytest.mark.parametrize("kind", KINDS)
def test_values_and_gradients(kind, impl):
    check(kind, impl, seed=KINDS.index(kind))


# (policy softcap, logit_scale, reference softcap, logit_scale): every kind meets a different pair on both paths.
HEADS = [(30.0, 1.0, None, 1.0), (5.0, 0.5, 5.0, 0.5), (None, 0.5, 30.0, 1.0), (5.0, 1.0, None, 0.5),
         (30.0, 0.5, 5.0, 1.0), (None, 1.0, 5.0, 0.5), (5.0, 0.5, 30.0, 0.5)]


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("kind", KINDS)
def test_softcap_and_logit_scale(kind, impl):
    i = KINDS.index(kind)
    check(kind, impl, seed=30 + i, heads=HEADS[i], ref_grad=i % 2 == 0, temperature=0.7)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_softcap_bf16(impl):
    check("js", impl, dtype=torch.bfloat16, seed=41, heads=(5.0, 0.5, 30.0, 1.0))


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("kind", ["fkl", "js", "hellinger"])
def test_reference_side_gradients(kind, impl):
    check(kind, impl, ref_grad=True, seed=20, temperature=1.0)


@pytest.mark.parametrize("kind", ["fkl", "js", "tv"])
def test_torch_path_many_chunks_and_tiles(kind, monkeypatch):
    import sys
    lp, ld = sys.modules["dph_kernels.linear_logprob"], sys.modules["dph_kernels.linear_divergence"]
    monkeypatch.setattr(ld, "CHUNK_BYTES", 2 * 5 * 301 * 4)  # forward: 5 rows per chunk, 21 rows
    monkeypatch.setattr(ld, "BLOCK_BYTES", 5 * 70 * 4)  # ... in column blocks of 70
    monkeypatch.setattr(ld, "TILE_BYTES", 8 * 64 * 4)  # backward: 3 row blocks x 5 vocab chunks
    monkeypatch.setattr(lp, "MIN_TILE_COLS", 64)
    assert [len(x) for x in lp.tiles(21, 301, 4, ld.TILE_BYTES)] == [3, 5]
    check(kind, "torch", ref_grad=True, seed=40, temperature=1.1)


# The Triton backward in vocabulary chunks (V = 301): 3 chunks of 128 with a short last one, and 256 + 45.
@pytest.mark.parametrize("chunk_cols, dtype, ref_grad", [(128, torch.float32, True), (256, torch.bfloat16, False),
                                                         (128, torch.bfloat16, True)], ids=str)
def test_triton_backward_vocabulary_chunks(chunk_cols, dtype, ref_grad):
    check("js", "triton", dtype=dtype, ref_grad=ref_grad, seed=43, heads=(5.0, 1.0, None, 1.0),
          chunk_cols=chunk_cols)


@pytest.mark.parametrize("impl, kind", [("torch", "fkl"), ("torch", "js"), ("triton", "js")])
def test_ignored_nan_rows_stay_out(impl, kind):  # torch fkl has its own one-pass forward
    (h, w, b, rh, rw, rb), mask = make_heads(seed=41)
    h[0, 1, 3], rh[1, 2, 0] = float("nan"), float("inf")
    mask[0, 1], mask[1, 2] = False, False
    h.requires_grad_()
    w.requires_grad_()
    out = dk.linear_f_divergence(h, w, rh, rw, kind=kind, bias=b, ref_bias=rb, mask=mask, impl=impl)
    assert torch.isfinite(out).all() and out[0, 1] == 0 and out[1, 2] == 0
    out.sum().backward()
    assert torch.isfinite(w.grad).all() and torch.isfinite(h.grad).all()


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_bf16(impl):
    check("js", impl, dtype=torch.bfloat16, seed=30)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_identities(impl):
    (h, w, b, rh, rw, rb), _ = make_heads(Dr=40, seed=5)
    h, w, b, rh, rw, rb = on(impl, h, w, b, rh, rw, rb)
    for kind in KINDS:
        same = dk.linear_f_divergence(h, w, h, w, kind=kind, bias=b, ref_bias=b, impl=impl)
        assert float(same.abs().max()) < 1e-5, kind
        d = dk.linear_f_divergence(h, w, rh, rw, kind=kind, bias=b, ref_bias=rb, impl=impl)
        assert (d >= -1e-6).all(), kind
    js = dk.linear_f_divergence(h, w * 20, rh, rw * 20, kind="js", impl=impl)  # nearly disjoint, peaked heads
    assert (js <= math.log(2) + 1e-5).all() and float(js.max()) > 0.5
    fkl = dk.linear_f_divergence(h, w, rh, rw, kind="fkl", impl=impl)
    rkl_swapped = dk.linear_f_divergence(rh, rw, h, w, kind="rkl", impl=impl)
    assert torch.allclose(fkl, rkl_swapped, atol=1e-5)
    k1 = dk.linear_f_divergence(h, w, rh, rw, kind="fkl_k1", impl=impl)
    assert torch.allclose(fkl, k1, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_sampled_estimator_converges_to_exact(kind):
    (h, w, _, rh, rw, _), _ = make_heads(lead=(4,), V=53, seed=8, bias=False)
    exact = dk.linear_f_divergence(h.double(), w.double(), rh.double(), rw.double(), kind=kind, alpha=0.35,
                                   impl="torch")
    log_p = torch.log_softmax(h.double() @ w.double().T, -1)
    log_q = torch.log_softmax(rh.double() @ rw.double().T, -1)
    M = 100_000
    torch.manual_seed(1)
    y = torch.multinomial(log_q.exp(), M, replacement=True)  # (4, M) samples from pi_ref
    g = dk.f_divergence(log_p.gather(1, y) - log_q.gather(1, y), kind, alpha=0.35)
    est, sem = g.mean(1), g.std(1) / math.sqrt(M)
    assert torch.all((est - exact).abs() < 5 * sem + 1e-9), (kind, est, exact, sem)


def test_fused_exact_mode_matches_composition():
    (h, w, _, rh, rw, _), _ = make_heads(lead=(4, 6), Dr=40, seed=12, bias=False)
    g = torch.Generator().manual_seed(3)
    targets = torch.randint(0, w.shape[0], (4, 6), generator=g)
    mask = torch.ones(4, 6, dtype=torch.bool)
    is_pef = torch.tensor([True, False, True, False])
    adv = torch.randn(4, generator=g)
    for impl in ["torch", "triton"]:
        fn = dk.FusedLinearDPHLoss(divergence="js", eta=0.5, divergence_mode="exact", impl=impl)
        hh = h.clone().requires_grad_()
        out = fn(*on(impl, hh, w, targets, mask, is_pef), advantages=on(impl, adv)[0],
                 ref_hidden=on(impl, rh)[0], ref_weight=on(impl, rw)[0])
        out.loss.backward()
        h64 = h.double().requires_grad_()
        lp = ref.linear_logprob(h64, w.double(), targets)
        exp_rows = ~is_pef
        L_exp = -(adv.double()[exp_rows, None] * torch.ones_like(lp[exp_rows])).mul(
            torch.exp(lp[exp_rows] - lp[exp_rows].detach())).mean()
        div = ref.linear_f_divergence(h64, w.double(), rh.double(), rw.double(), "js")
        L = L_exp + 0.5 * div[is_pef].mean()
        L.backward()
        assert abs(float(out.loss) - float(L)) < 1e-5
        assert float((hh.grad.double() - h64.grad).abs().max()) < 1e-5
        assert out.metrics["divergence_mean"] == pytest.approx(float(div[is_pef].mean()), rel=1e-4)


def test_errors():
    (h, w, b, rh, rw, rb), _ = make_heads()
    with pytest.raises(ValueError, match="ref_weight"):
        dk.linear_f_divergence(h, w, rh, rw[:-1])
    with pytest.raises(ValueError, match="ref_hidden"):
        dk.linear_f_divergence(h, w, rh[:2], rw)
    with pytest.raises(ValueError, match="mask"):
        dk.linear_f_divergence(h, w, rh, rw, mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="kind"):
        dk.linear_f_divergence(h, w, rh, rw, kind="kl")
    with pytest.raises(ValueError, match="ref_weight"):
        dk.linear_f_divergence(h, w, rh, rw[:, :5])
