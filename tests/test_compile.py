"""torch.compile and CUDA graphs: the ops as torch.library custom ops (fake implementations, registered autograd), and
no host synchronisation under compile. A step calling dk.linear_logprob, dk.FusedLinearDPHLoss and
dk.linear_f_divergence compiles with fullgraph=True and no graph break, and matches the float64 truth under the
numerics contract; a CUDA-graph capture-and-replay runs under `pytest -m gpu`."""
import math

import pytest
import torch

import dph_kernels as dk
from numerics import assert_contract

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _batch(seed=0, B=4, T=6, D=16, V=40):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, D, generator=g)
    w = torch.randn(V, D, generator=g) * 2 / math.sqrt(D)
    t = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[:, :2] = False  # a prompt
    extra = dict(is_pef=torch.tensor([False, True, False, False]), advantages=torch.randn(B, generator=g),
                 old_logp=-torch.rand(B, T, generator=g) * 3, ref_logp=-torch.rand(B, T, generator=g) * 3)
    return h, w, t, mask, extra


def _step(loss_fn, t, mask, extra, impl="auto"):
    def step(h, w, rh, rw):
        out = loss_fn(h, w, t, mask, extra["is_pef"], advantages=extra["advantages"], old_logp=extra["old_logp"],
                      ref_logp=extra["ref_logp"])
        lp, ent = dk.linear_logprob(h, w, torch.where(mask, t, -100), return_entropy=True)
        div = dk.linear_f_divergence(h, w, rh, rw, kind="js", mask=mask, impl=impl)
        return out.loss + 0.1 * lp.sum() + 0.05 * ent.sum() + 0.2 * div.sum(), out.metrics["entropy_mean"]
    return step


@pytest.mark.parametrize("loss_kw", [dict(preset="dph-js"), dict(preset="grpo", policy_loss="ppo",
                                                                  importance_sampling_level="sequence"),
                                     dict(preset="grpo", policy_loss="cispo")], ids=str)
def test_fullgraph_compile_has_no_graph_break_and_matches_the_truth(loss_kw):
    torch._dynamo.reset()
    h, w, t, mask, extra = _batch()
    kw = dict(loss_kw)
    loss_fn = dk.FusedLinearDPHLoss.preset(kw.pop("preset"), log_entropy=True, **kw)
    if loss_fn.cfg["divergence"] is None:
        extra = {**extra, "is_pef": torch.zeros(4, dtype=torch.bool)}
    g = torch.Generator().manual_seed(9)
    rh, rw = h + 0.3 * torch.randn(h.shape, generator=g), w + 0.1 * torch.randn(w.shape, generator=g)
    step = _step(loss_fn, t, mask, extra)
    explained = torch._dynamo.explain(step)(h, w, rh, rw)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1

    def grads(fn, dtype):
        leaves = [x.to(dtype).requires_grad_() for x in (h, w)]
        loss, ent = fn(*leaves, rh.to(dtype), rw.to(dtype))
        return [loss.detach(), *torch.autograd.grad(loss, leaves)], ent

    compiled, ent_c = grads(torch.compile(step, fullgraph=True), torch.float32)
    eager, ent_e = grads(step, torch.float32)
    truth, _ = grads(_step(loss_fn, t, mask, extra, impl="torch"), torch.float64)  # auto refuses float64 there
    assert isinstance(ent_c, torch.Tensor) and float(ent_c) == pytest.approx(ent_e, rel=1e-5)  # metrics stay tensors
    for name, c, e, tr in zip(("loss", "dh", "dW"), compiled, eager, truth):
        assert_contract(f"compiled {name}", c, e, tr, torch.float32)


def test_custom_ops_pass_torch_library_opcheck():
    h, w, t, mask, _ = _batch(seed=2)
    N = t.numel()
    valid = mask.reshape(-1)
    args = (h.reshape(N, -1).requires_grad_(), w.clone().requires_grad_(), None, t.reshape(-1), valid, 1.0, None,
            True, "torch")
    torch.library.opcheck(torch.ops.dph.linear_logprob.default, args)
    rh, rw = h.reshape(N, -1) + 0.1, w * 0.9
    fargs = (h.reshape(N, -1).requires_grad_(), w.clone().requires_grad_(), None, rh, rw, None, valid,
             1.0, None, 1.0, None, "js", 0.5, "torch")
    torch.library.opcheck(torch.ops.dph.linear_f_divergence.default, fargs)


def test_eager_errors_stay_as_they_were():
    h, w, t, mask, extra = _batch()
    loss_fn = dk.FusedLinearDPHLoss.preset("dph-js")
    bad = extra["ref_logp"].clone()
    bad[1, 3] = 0.5
    with pytest.raises(ValueError, match=r"ref_logp\[1, 3\]"):
        loss_fn(h, w, t, mask, extra["is_pef"], advantages=extra["advantages"], ref_logp=bad)
    out = loss_fn(h, w, t, mask, extra["is_pef"], advantages=extra["advantages"], ref_logp=extra["ref_logp"])
    assert isinstance(out.metrics["loss"], float) and isinstance(out.metrics["n_tokens_exp"], int)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_capture_and_replay():
    """The custom ops (the path torch.compile takes) forward + backward inside one captured CUDA graph."""
    h, w, t, mask, _ = _batch(seed=5, B=8, T=64, D=64, V=1000)
    N = t.numel()
    h, w = h.reshape(N, -1).cuda(), w.cuda()
    tgt, valid = torch.where(mask, t, 0).reshape(-1).cuda(), mask.reshape(-1).cuda()
    g_up = torch.randn(N, device="cuda")

    def run():
        logp, ent, a, b = torch.ops.dph.linear_logprob(h, w, None, tgt, valid, 1.0, None, True, "triton")
        return (logp, *torch.ops.dph.linear_logprob_backward(h, w, None, tgt, valid, ent, a, b, g_up, g_up * 0.5,
                                                              1.0, None, "triton", True, True))

    want = run()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # warm-up on the side stream (Triton compiles, cuBLAS workspaces)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(out[:3], want[:3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
