"""Worker of test_vocab_parallel.py (run by torchrun): every vocab-parallel kernel against the float64 truth of
the whole head, under the numerics contract. V = 1001 over the group's ranks (uneven for 2 ranks: the last shard is
zero-padded, vocab_size=1001). Rank 0 writes one JSON report.

    python -m torch.distributed.run --nproc_per_node=2 tests/vp_worker.py REPORT.json [CASE ...]

DPH_VP_DEVICE=cuda (benchmarks/gpu_check.py) runs the kernels on each rank's GPU over NCCL (real Triton kernels),
with the truth still computed on the CPU; without it, CPU tensors over gloo (the Triton interpreter).
"""
import json
import math
import os
import sys

if os.environ.get("DPH_VP_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton decorates the kernels

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dph_kernels as dk  # noqa: E402
from dph_kernels.distributed import shard_rows  # noqa: E402
from numerics import TOL, max_err  # noqa: E402

DEVICE = os.environ.get("DPH_VP_DEVICE", "cpu")
N_LEAD, D, V = (37,), 67, 1001
B, T = 3, 13  # the fused loss: 39 positions


def problem(dtype, seed=0, bias=True, lead=N_LEAD, big_logit=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, D, generator=g)
    weight = torch.randn(V, D, generator=g) / math.sqrt(D) * 3.0  # peaked, non-uniform softmax
    b = torch.randn(V, generator=g) if bias else None
    if big_logit:  # one entry ~150 nats above the rest, on the last shard: the merge must rescale the others
        b[V - 3] += 150.0
    targets = torch.randint(0, V, lead, generator=g)
    targets[torch.rand(lead, generator=g) < 0.15] = -100
    ref_hidden = torch.randn(*lead, D + 3, generator=g)
    ref_weight = torch.randn(V, D + 3, generator=g) / math.sqrt(D) * 3.0
    return dict(hidden=hidden, weight=weight, bias=b, targets=targets, ref_hidden=ref_hidden, ref_weight=ref_weight,
                upstream=[torch.randn(lead, generator=g) for _ in range(2)], dtype=dtype)


def fused_inputs(seed=3):
    g = torch.Generator().manual_seed(seed)
    loss_mask = torch.rand(B, T, generator=g) < 0.8
    is_pef = torch.tensor([False, True, False])
    adv = torch.randn(B, generator=g)
    old = -torch.rand(B, T, generator=g) * 4 - 0.5
    ref_logp = -torch.rand(B, T, generator=g) * 4 - 0.5
    return dict(loss_mask=loss_mask, is_pef=is_pef, advantages=adv, old_logp=old, ref_logp=ref_logp)


# Each case: fn(p, hidden, weight, bias, impl, **vp) -> tuple of outputs; vp is {} for the whole head or
# dict(process_group=..., vocab_size=...) for this rank's shard. impl="reference" gives the eager math (the truth in
# float64, the same-dtype comparison otherwise).
def case_logprob(impl, dtype, entropy, softcap=None, big_logit=False, chunk_cols=None):
    def fn(p, h, w, b, impl, **vp):
        out = dk.linear_logprob(h, w, p["targets"].to(h.device), bias=b, temperature=0.7, return_entropy=entropy, impl=impl,
                                softcap=softcap, chunk_cols=chunk_cols, **vp)
        return out if entropy else (out,)
    return dict(fn=fn, impl=impl, dtype=dtype, big_logit=big_logit, outputs=["logp", "entropy"][:1 + entropy])


def case_fused(impl, preset):
    extra = fused_inputs()

    def fn(p, h, w, b, impl, **vp):
        loss_fn = dk.FusedLinearDPHLoss.preset(preset, impl=impl, log_entropy=True, **vp)
        x = {k: v.to(h.device) for k, v in extra.items()}
        tgt = p["targets"].reshape(B, T).to(h.device)
        is_pef = torch.zeros_like(x["is_pef"]) if preset == "grpo" else x["is_pef"]
        out = loss_fn(h.reshape(B, T, D), w, tgt, x["loss_mask"], is_pef, advantages=x["advantages"],
                      old_logp=x["old_logp"], ref_logp=x["ref_logp"], bias=b)
        return (out.loss,)
    return dict(fn=fn, impl=impl, dtype=torch.float32, lead=(B * T,), outputs=["loss"])


def case_divergence(impl, kind):
    def fn(p, h, w, b, impl, **vp):
        rh = p["ref_hidden"].to(h.dtype)
        rw = p["ref_weight"].to(h.dtype)
        if vp:
            rw = shard_rows(rw, dist.get_rank(), dist.get_world_size())
        rh, rw, mask = rh.to(h.device), rw.to(h.device), (p["targets"] != -100).to(h.device)
        return (dk.linear_f_divergence(h, w, rh, rw, kind=kind, bias=b, temperature=0.7, mask=mask, impl=impl,
                                       **vp),)
    return dict(fn=fn, impl=impl, dtype=torch.float32, outputs=["divergence"])


CASES = {
    "logprob-torch-fp32-entropy": case_logprob("torch", torch.float32, True),
    "logprob-triton-fp32-entropy": case_logprob("triton", torch.float32, True),
    "logprob-torch-bf16-entropy": case_logprob("torch", torch.bfloat16, True),
    "logprob-triton-bf16": case_logprob("triton", torch.bfloat16, False),
    "logprob-torch-fp32-softcap": case_logprob("torch", torch.float32, True, softcap=5.0),
    "logprob-triton-fp32-softcap": case_logprob("triton", torch.float32, False, softcap=5.0),
    "logprob-torch-fp32-big-logit": case_logprob("torch", torch.float32, True, big_logit=True),
    "logprob-triton-fp32-big-logit": case_logprob("triton", torch.float32, True, big_logit=True),
    # The backward in vocabulary chunks of 128 columns: 4 per 501-row shard, the last one short.
    "logprob-triton-fp32-entropy-chunks": case_logprob("triton", torch.float32, True, chunk_cols=128),
    "fused-torch-grpo": case_fused("torch", "grpo"),
    "fused-torch-dph-js": case_fused("torch", "dph-js"),
    "fused-triton-grpo": case_fused("triton", "grpo"),
    "fused-triton-dph-js": case_fused("triton", "dph-js"),
    "divergence-torch-js": case_divergence("torch", "js"),
    "divergence-triton-js": case_divergence("triton", "js"),
    "divergence-torch-fkl": case_divergence("torch", "fkl"),
}


def grads_of(fn, p, inputs, upstream, impl, **vp):
    leaves = [None if x is None else x.detach().clone().requires_grad_() for x in inputs]
    outs = fn(p, *leaves, impl, **vp)
    loss = sum((o.double() * u.double()).sum() for o, u in zip(outs, upstream))
    grads = torch.autograd.grad(loss, [x for x in leaves if x is not None])
    return [o.detach() for o in outs], list(grads)


def gather_rows(shard_grad):
    parts = [torch.zeros_like(shard_grad) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, shard_grad.contiguous())
    return torch.cat(parts)[:V]


def run_case(name, case):
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = case["dtype"]
    p = problem(dtype, seed=len(name), lead=case.get("lead", N_LEAD), big_logit=case.get("big_logit", False))
    full = [p["hidden"], p["weight"], p["bias"]]
    upstream = [torch.tensor(1.0)] if case["outputs"] == ["loss"] else p["upstream"][:len(case["outputs"])]
    fn, impl = case["fn"], case["impl"]
    truth_out, truth_grads = grads_of(fn, p, [x.double() for x in full], upstream, "reference")
    same_out, same_grads = grads_of(fn, p, [x.to(dtype) for x in full], upstream, "reference")
    dev = [u.to(DEVICE) for u in upstream]
    shard = [p["hidden"].to(dtype)] + [shard_rows(x.to(dtype), rank, world) for x in full[1:]]
    vp_out, vp_grads = grads_of(fn, p, [x.to(DEVICE) for x in shard], dev, impl, process_group=dist.group.WORLD,
                                vocab_size=V)
    one_out, one_grads = grads_of(fn, p, [x.to(dtype).to(DEVICE) for x in full], dev, impl)  # the same kernel, alone
    padded_ok = all(float(g[V - rank * g.shape[0]:].abs().max()) == 0.0 for g in vp_grads[1:]
                    if rank * g.shape[0] + g.shape[0] > V)
    vp_grads = [vp_grads[0]] + [gather_rows(g) for g in vp_grads[1:]]
    replicated = [torch.zeros_like(vp_out[0]) for _ in range(world)]
    dist.all_gather(replicated, vp_out[0].contiguous())
    vp_out, vp_grads, one_out, one_grads = ([x.cpu() for x in xs] for xs in (vp_out, vp_grads, one_out, one_grads))
    report = dict(replicated=all(torch.equal(r, vp_out[0]) for r in replicated), padding_grad_zero=padded_ok,
                  quantities={})
    names = case["outputs"] + ["d_hidden", "d_weight", "d_bias"]
    for qname, k, s, t, one in zip(names, vp_out + vp_grads, same_out + same_grads, truth_out + truth_grads,
                                   one_out + one_grads):
        k_err, s_err = max_err(k, t), max_err(s, t)
        report["quantities"][qname] = dict(kernel_err=k_err, torch_err=s_err, bound=2 * s_err + TOL[dtype],
                                           vs_one_process=max_err(k, one), dtype=str(k.dtype),
                                           same_dtype=k.dtype == (torch.float32 if qname in case["outputs"]
                                                                  else dtype))
    return report


def _rss_now():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _rss_peak():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_growth(group, rows, N=16, D=1024, vocab=65536):
    """Peak RSS growth (bytes) of one linear_logprob forward + backward (torch path, entropy on) on a (rows, D)
    shard: the weight and inputs exist before the baseline. Buffers of this size are mmapped, so freed memory
    leaves RSS and the peak of a later, larger run shows."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, D, generator=g).requires_grad_()
    w = (torch.randn(rows, D, generator=g) * 0.05).requires_grad_()
    t = torch.randint(0, vocab, (N,), generator=g)
    base = _rss_now()
    lp, ent = dk.linear_logprob(h, w, t, return_entropy=True, impl="torch", process_group=group, vocab_size=vocab)
    (lp.sum() + ent.sum()).backward()
    return _rss_peak() - base


def memory_report():
    """Per-rank memory of the vocab-parallel head: at many tokens (against one [N, V / P] fp32 logits buffer), and at
    a large weight against the same head on one rank (a group of one). Run in order of growing peaks, since only a
    new peak shows in ru_maxrss."""
    world, rank, vocab = dist.get_world_size(), dist.get_rank(), 65536
    solo = dist.new_group([0])  # every rank takes part in creating it
    memory_growth(dist.group.WORLD, 64, N=8, D=16, vocab=64 * world)  # first-call costs (lazy imports, pools)

    def every_rank(x):
        out = [torch.zeros(1) for _ in range(world)]
        dist.all_gather(out, torch.tensor([float(x)]))
        return [float(v) for v in out]

    many_tokens = every_rank(memory_growth(dist.group.WORLD, vocab // world, N=1024, D=128, vocab=vocab))
    big_weight = every_rank(memory_growth(dist.group.WORLD, vocab // world, vocab=vocab))
    one = memory_growth(solo, vocab, vocab=vocab) if rank == 0 else None
    return dict(many_tokens_growth=many_tokens, shard_logits_bytes=1024 * (vocab // world) * 4,
                vp_growth=big_weight, one_growth=one, full_weight_bytes=vocab * 1024 * 4)


def error_report():
    """Bad layouts raise on every rank at once (none is left waiting in a collective): unequal shards, and a
    vocab_size the shards cannot hold."""
    rank, world = dist.get_rank(), dist.get_world_size()
    h, t = torch.randn(5, 8), torch.randint(0, 16, (5,))
    attempts = dict(unequal_rows=dict(weight=torch.randn(8 + rank, 8)),
                    vocab_size_too_big=dict(weight=torch.randn(8, 8), vocab_size=8 * world + 1))
    out = {}
    for name, kw in attempts.items():
        try:
            dk.linear_logprob(h, kw["weight"], t, impl="torch", process_group=dist.group.WORLD,
                              vocab_size=kw.get("vocab_size"))
            msg = None
        except ValueError as e:
            msg = str(e)
        every = [None] * world
        dist.all_gather_object(every, msg)
        out[name] = every
    return out


def main(report_path, names):
    global DEVICE
    if DEVICE == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        DEVICE = f"cuda:{torch.cuda.current_device()}"
    dist.init_process_group("nccl" if DEVICE.startswith("cuda") else "gloo")
    torch.set_num_threads(1)
    out = {}
    special = dict(memory=memory_report, errors=error_report)  # CPU-only (RSS; CPU tensors)
    for name in names or list(CASES) + ([] if DEVICE.startswith("cuda") else list(special)):
        out[name] = special[name]() if name in special else run_case(name, CASES[name])
    if dist.get_rank() == 0:
        with open(report_path, "w") as f:
            json.dump(dict(world=dist.get_world_size(), cases=out), f, indent=1)
    dist.barrier()  # every rank is done with the group before any tears it down
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
