import math

import pytest
import torch

import dph_kernels as dk
from dph_kernels import reference as ref
from numerics import assert_contract, run_with_grads

pytestmark = pytest.mark.gpu  # on a CUDA machine `pytest -m gpu` runs these with the Triton kernels on the GPU
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IMPLS = ["torch", "triton", "reference"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_problem(lead, D, V, dtype, *, bias=False, seed=0, ignore_frac=0.15, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, D, generator=g)
    weight = torch.randn(V, D, generator=g) / math.sqrt(D) * 3.0  # peaked, non-uniform softmax
    b = torch.randn(V, generator=g) if bias else None
    targets = torch.randint(0, V, lead, generator=g)
    targets[torch.rand(lead, generator=g) < ignore_frac] = -100
    to = dict(device=device)
    return (hidden.to(dtype=dtype, **to), weight.to(dtype=dtype, **to),
            None if b is None else b.to(dtype=dtype, **to), targets.to(**to))


def check_against_truth(impl, lead, D, V, dtype, *, bias, temperature, entropy, seed=0, big_logit_at=None,
                        softcap=None, logit_scale=1.0, chunk_cols=None):
    hidden, weight, b, targets = make_problem(lead, D, V, dtype, bias=bias, seed=seed)
    if big_logit_at is not None:  # one vocabulary entry ~150 nats above the rest in every row
        b[big_logit_at] += 150.0
    g = torch.Generator().manual_seed(seed + 1)
    # Non-uniform upstream gradients, one per token and per output.
    upstream = [torch.randn(lead, generator=g).to(hidden.device) for _ in range(2 if entropy else 1)]

    def kernel(h, w, bb):
        return dk.linear_logprob(h, w, targets, bias=bb, temperature=temperature, return_entropy=entropy, impl=impl,
                                 softcap=softcap, logit_scale=logit_scale, chunk_cols=chunk_cols)

    def torch_math(h, w, bb):
        return ref.linear_logprob(h, w, targets, bb, temperature, -100, entropy, softcap, logit_scale)

    inputs = [hidden, weight, b]
    k_out, k_grads = run_with_grads(kernel, inputs, upstream)
    same_out, same_grads = run_with_grads(torch_math, [x.cpu() if x is not None else None for x in inputs],
                                          [u.cpu() for u in upstream])
    truth_out, truth_grads = run_with_grads(
        torch_math, [x.cpu().double() if x is not None else None for x in inputs], [u.cpu() for u in upstream])
    for o in k_out:
        assert o.dtype == torch.float32 and o.shape == targets.shape
    names = ["logp", "entropy"][: len(k_out)]
    for name, k, s, t in zip(names, k_out, same_out, truth_out):
        assert_contract(f"{impl} {dtype} {name}", k.cpu(), s, t, dtype)
    for name, k, s, t in zip(["d_hidden", "d_weight", "d_bias"], k_grads, same_grads, truth_grads):
        assert k.dtype == dtype
        assert_contract(f"{impl} {dtype} {name}", k.cpu(), s, t, dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_odd_shape_all_features(impl, dtype):
    check_against_truth(impl, (37,), 67, 1001, dtype, bias=True, temperature=0.7, entropy=True)


# softcap x logit_scale x dtype x impl x entropy: a pairwise subset (every pair of values appears in some case).
HEAD_CASES = [
    ("torch", torch.float32, 30.0, 1.0, True), ("torch", torch.bfloat16, 5.0, 0.5, False),
    ("torch", torch.float32, None, 0.5, False), ("torch", torch.bfloat16, 30.0, 0.5, True),
    ("triton", torch.float32, 5.0, 1.0, True), ("triton", torch.bfloat16, 30.0, 0.5, False),
    ("triton", torch.float32, None, 0.5, True), ("triton", torch.bfloat16, 5.0, 1.0, True),
    ("reference", torch.float32, 5.0, 0.5, True),
]


@pytest.mark.parametrize("impl, dtype, softcap, logit_scale, entropy", HEAD_CASES, ids=str)
def test_softcap_and_logit_scale(impl, dtype, softcap, logit_scale, entropy):
    """Odd shape, temperature != 1, bias, ignored tokens, logits large enough (std ~3 plus a unit bias, before the
    scale) that a cap of 5 bends most of them."""
    check_against_truth(impl, (37,), 67, 1001, dtype, bias=True, temperature=0.7, entropy=entropy, seed=5,
                        softcap=softcap, logit_scale=logit_scale)


def test_softcap_changes_the_answer_and_order_matters():
    hidden, weight, b, targets = make_problem((9,), 16, 50, torch.float64, bias=True, device="cpu")
    plain = dk.linear_logprob(hidden, weight, targets, bias=b, impl="torch")
    capped = dk.linear_logprob(hidden, weight, targets, bias=b, impl="torch", softcap=2.0)
    assert float((plain - capped).abs().max()) > 0.1
    # scale before the cap: 2 * tanh(0.5 a / 2) is not 0.5 * 2 tanh(a / 2)
    z = ref.head_transform(torch.tensor([3.0], dtype=torch.float64), softcap=2.0, logit_scale=0.5)
    assert float(z) == pytest.approx(2.0 * math.tanh(0.75))
    with pytest.raises(ValueError, match="softcap"):
        dk.linear_logprob(hidden, weight, targets, impl="torch", softcap=0.0)
    with pytest.raises(TypeError, match="logit_scale"):
        dk.linear_logprob(hidden, weight, targets, impl="torch", logit_scale=None)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_leading_shape_and_options(impl, entropy, bias):
    check_against_truth(impl, (3, 7), 33, 517, torch.float32, bias=bias, temperature=1.0, entropy=entropy, seed=3)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_several_chunks_and_vocab_blocks(impl, monkeypatch):
    # Force the chunked path through many chunks, and the Triton path through many tiles.
    import sys
    module = sys.modules["dph_kernels.linear_logprob"]
    monkeypatch.setattr(module, "CHUNK_BYTES", 8 * 300 * 4)
    # tiles of 20 rows x 64 columns: 4 row blocks (the last one short) x 5 vocab chunks (the last one short)
    monkeypatch.setattr(module, "TILE_BYTES", 20 * 64 * 4)
    monkeypatch.setattr(module, "MIN_TILE_COLS", 64)
    assert [len(x) for x in module.tiles(70, 300, 4)] == [4, 5]
    check_against_truth(impl, (70,), 40, 300, torch.float32, bias=True, temperature=1.3, entropy=True, seed=5)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("entropy", [False, True])
def test_logit_far_above_the_first_chunk(impl, entropy, monkeypatch):
    # The tiled torch path shifts by the first vocab chunk's row max; a later logit 150 nats higher overflows that
    # sum (e^150 > fp32 max) and the rows must be redone with their true max. Logits this large also test that
    # backward's softmax is not rounded through an lse of ~150 (fp32 ulp 1.5e-5).
    import sys
    module = sys.modules["dph_kernels.linear_logprob"]
    monkeypatch.setattr(module, "TILE_BYTES", 20 * 64 * 4)
    monkeypatch.setattr(module, "MIN_TILE_COLS", 64)
    check_against_truth(impl, (45,), 24, 300, torch.float32, bias=True, temperature=1.0, entropy=entropy,
                        seed=11, big_logit_at=250)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logit_far_above_the_rest_in_the_first_chunk(impl, temperature):
    # The largest logit in the chunk that sets the shift: forward's exp(z - shift) of it is exactly 1, and backward
    # must recompute the same 1 (an addmm fused with the shift rounded z - shift instead: d_hidden 1.1e-5 off, 66x
    # the eager error, before the fix).
    check_against_truth(impl, (37,), 67, 1001, torch.float32, bias=True, temperature=temperature, entropy=True,
                        big_logit_at=998)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_invariants(impl):
    hidden, weight, _, targets = make_problem((4, 9), 24, 211, torch.float32, seed=7)
    logp, ent = dk.linear_logprob(hidden, weight, targets, return_entropy=True, impl=impl)
    assert (logp <= 0).all() and (ent >= 0).all()
    assert (ent <= math.log(211) + 1e-5).all()
    # The same batch scored twice gives exactly the same log-probs: an on-policy ratio is exactly 1.
    again = dk.linear_logprob(hidden, weight, targets, impl=impl)
    assert torch.equal(logp, again)
    assert torch.equal(torch.exp(again - logp), torch.ones_like(logp))


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_ignored_tokens_give_zero_and_no_gradient(impl):
    hidden, weight, _, targets = make_problem((20,), 16, 97, torch.float32, seed=2, ignore_frac=0.0)
    targets[[1, 5, 6]] = -1
    hidden = hidden.requires_grad_()
    logp, ent = dk.linear_logprob(hidden, weight, targets, ignore_index=-1, return_entropy=True, impl=impl)
    assert torch.all(logp[[1, 5, 6]] == 0) and torch.all(ent[[1, 5, 6]] == 0)
    (logp.sum() + ent.sum()).backward()
    assert torch.all(hidden.grad[[1, 5, 6]] == 0)
    assert torch.all(hidden.grad[0] != 0)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_nan_stays_in_its_token(impl):
    hidden, weight, _, targets = make_problem((12,), 16, 97, torch.float32, seed=4, ignore_frac=0.0)
    clean = dk.linear_logprob(hidden, weight, targets, impl=impl)
    hidden[3, 2] = float("nan")
    hidden[8, 0] = float("inf")
    dirty, ent = dk.linear_logprob(hidden, weight, targets, return_entropy=True, impl=impl)
    others = [i for i in range(12) if i not in (3, 8)]
    assert torch.isnan(dirty[3]) and torch.isnan(dirty[8]) and torch.isnan(ent[3])
    assert torch.equal(dirty[others], clean[others])
    # An ignored NaN token stays out of the gradients of the others.
    targets[3] = -100
    targets[8] = -100
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    dk.linear_logprob(h, w, targets, impl=impl).sum().backward()
    assert torch.isfinite(w.grad).all() and torch.isfinite(h.grad).all()


# The Triton backward in vocabulary chunks (linear_logprob_triton.head_grads): V = 1001 as one chunk (the default
# here), exactly one chunk, 4 chunks with a short last one (256 columns), 8 chunks (128); each with the features on.
CHUNK_CASES = [(None, torch.float32, None), (1001, torch.bfloat16, None), (256, torch.float32, 5.0),
               (256, torch.bfloat16, None), (128, torch.float32, None), (128, torch.bfloat16, 30.0)]


@pytest.mark.parametrize("chunk_cols, dtype, softcap", CHUNK_CASES, ids=str)
def test_triton_backward_vocabulary_chunks(chunk_cols, dtype, softcap):
    check_against_truth("triton", (37,), 67, 1001, dtype, bias=True, temperature=0.8, entropy=True, seed=13,
                        softcap=softcap, chunk_cols=chunk_cols)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_backward_is_bitwise_repeatable(impl):
    # No atomics: every gradient element is written by one program or one GEMM in a fixed order.
    hidden, weight, b, targets = make_problem((29,), 40, 300, torch.float32, bias=True, seed=17)
    grads = []
    for _ in range(2):
        leaves = [x.clone().requires_grad_() for x in (hidden, weight, b)]
        logp, ent = dk.linear_logprob(leaves[0], leaves[1], targets, bias=leaves[2], return_entropy=True,
                                      impl=impl, chunk_cols=128)
        (logp * torch.linspace(-1, 2, 29) + ent).sum().backward()
        grads.append([x.grad for x in leaves])
    assert all(torch.equal(a, c) for a, c in zip(*grads))


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_rows_without_loss_never_reach_the_kernels(impl, monkeypatch):
    # Half the rows ignored: forward and backward see only the other half, and the answers are unchanged.
    import sys
    from dph_kernels import linear_logprob_triton as tk
    module = sys.modules["dph_kernels.linear_logprob"]
    hidden, weight, _, targets = make_problem((40,), 16, 97, torch.float32, seed=6, ignore_frac=0.0)
    targets[::2] = -100
    seen = []
    names = ["torch_forward_sums", "torch_backward"] if impl == "torch" else ["forward_stats", "backward"]
    owner = module if impl == "torch" else tk
    for name in names:
        fn = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda h, *a, _fn=fn, _name=name, **k: seen.append((_name, h.shape[0]))
                            or _fn(h, *a, **k))
    h = hidden.clone().requires_grad_()
    logp = dk.linear_logprob(h, weight, targets, impl=impl)
    logp.sum().backward()
    assert seen == [(names[0], 20), (names[1], 20)]
    assert torch.all(logp[::2] == 0) and torch.all(h.grad[::2] == 0)
    kept = dk.linear_logprob(hidden[1::2], weight, targets[1::2], impl=impl)
    assert torch.equal(logp[1::2], kept)


def test_auto_picks_torch_on_cpu_and_matches():
    hidden, weight, _, targets = make_problem((9,), 8, 50, torch.float32, device="cpu")
    assert torch.equal(dk.linear_logprob(hidden, weight, targets),
                       dk.linear_logprob(hidden, weight, targets, impl="torch"))


def test_large_vocab_smoke():
    V = 262144
    hidden, weight, _, targets = make_problem((6,), 16, V, torch.float32, device="cpu", ignore_frac=0.0)
    h = hidden.clone().requires_grad_()
    logp, ent = dk.linear_logprob(h, weight, targets, return_entropy=True, impl="torch")
    truth = ref.linear_logprob(hidden.double(), weight.double(), targets, return_entropy=True)
    assert float((logp.double() - truth[0]).abs().max()) < 1e-4
    assert float((ent.double() - truth[1]).abs().max()) < 1e-4
    (logp.sum() + ent.sum()).backward()
    assert torch.isfinite(h.grad).all()


def test_torch_path_memory_is_bounded_by_a_chunk():
    from dph_kernels.linear_logprob import CHUNK_BYTES, MIN_TILE_COLS, TILE_BYTES, _chunk_rows, tiles
    V = 50000
    assert _chunk_rows(V) * V * 4 <= CHUNK_BYTES
    assert _chunk_rows(10**9) == 1
    for N, V in [(37, 1001), (4096, 32768), (2048, 49152), (65536, 262144), (1, 10**9)]:
        row_blocks, vocab_chunks = tiles(N, V, 4)
        rows, cols = row_blocks[0].stop, vocab_chunks[0].stop
        assert rows * cols * 4 <= TILE_BYTES
        assert row_blocks[-1].stop == N and vocab_chunks[-1].stop == V
        assert cols >= min(V, MIN_TILE_COLS)


# ---------------------------------------------------------------------------------------------------------- errors
def _ok():
    return make_problem((5,), 8, 30, torch.float32, device="cpu", ignore_frac=0.0)


@pytest.mark.parametrize("mutate, exc, word", [
    (lambda h, w, b, t: (h[0], w, b, t), ValueError, "targets"),              # rank mismatch
    (lambda h, w, b, t: (h, w[:, :5], b, t), ValueError, "weight"),           # mismatched D
    (lambda h, w, b, t: (h, w[0], b, t), ValueError, "weight"),               # 1-D weight
    (lambda h, w, b, t: (h, w, b, t.float()), TypeError, "targets"),          # non-integer targets
    (lambda h, w, b, t: (h, w, b, t + 100), ValueError, "targets"),           # out of range
    (lambda h, w, b, t: (h, w, b, t - 10), ValueError, "targets"),            # negative, not ignore_index
    (lambda h, w, b, t: (h.int(), w, b, t), TypeError, "hidden"),             # unsupported dtype
    (lambda h, w, b, t: (h, w.half(), b, t), TypeError, "weight"),            # mixed dtypes
    (lambda h, w, b, t: (h[:0], w, b, t[:0]), ValueError, "hidden"),          # empty batch
    (lambda h, w, b, t: (h, w, torch.zeros(7), t), ValueError, "bias"),       # bias shape
    (lambda h, w, b, t: ("x", w, b, t), TypeError, "hidden"),                 # not a tensor
])
def test_bad_input_names_the_argument(mutate, exc, word):
    h, w, b, t = mutate(*_ok())
    with pytest.raises(exc, match=word):
        dk.linear_logprob(h, w, t, bias=b, impl="torch")


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature(temperature):
    h, w, _, t = _ok()
    with pytest.raises(ValueError, match="temperature"):
        dk.linear_logprob(h, w, t, temperature=temperature)


def test_bad_impl_and_fp64_triton():
    h, w, _, t = _ok()
    with pytest.raises(ValueError, match="impl"):
        dk.linear_logprob(h, w, t, impl="cuda")
    with pytest.raises(TypeError, match="hidden"):
        dk.linear_logprob(h.double(), w.double(), t, impl="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA to have two devices")
def test_mixed_devices():
    h, w, _, t = _ok()
    with pytest.raises(ValueError, match="weight"):
        dk.linear_logprob(h.cuda(), w, t.cuda())


def test_mixed_devices_meta():
    # A meta-device weight beside CPU hidden: caught before any compute.
    h, w, _, t = _ok()
    with pytest.raises(ValueError, match="weight"):
        dk.linear_logprob(h, w.to("meta"), t)
