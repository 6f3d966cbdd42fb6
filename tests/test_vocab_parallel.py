"""Vocab-parallel kernels (process_group=) in real torchrun processes (gloo, 2 ranks, CPU): the torch and Triton
(interpreter) paths of linear_logprob, FusedLinearDPHLoss and linear_f_divergence against the float64 truth of the
whole head at V = 1001 split unevenly (501 + 500 rows, the last shard zero-padded), per-rank memory, and errors.
One launch runs every case (tests/vp_worker.py); each test reads its part of the report."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import dph_kernels as dk
from vp_worker import CASES

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path, nproc=2, cases=()):
    report = tmp_path / "report.json"
    # A fixed mmap threshold: buffers >= 1 MiB are mmapped and go back to the OS when freed, so RSS is live memory
    # (glibc's sliding threshold would keep freed 8 MiB tiles on the heap and blur the memory case).
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1", MALLOC_MMAP_THRESHOLD_="1048576")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master-port={free_port()}",
           os.path.join(HERE, "vp_worker.py"), str(report), *cases]
    proc = subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"torchrun exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(report.read_text())


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("vp"))


@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64_truth_of_the_whole_head(report, case):
    r = report["cases"][case]
    assert report["world"] == 2
    assert r["replicated"], "the outputs must be identical on every rank"
    assert r["padding_grad_zero"], "the padded rows of the last shard must get a zero gradient"
    for name, q in r["quantities"].items():
        assert q["same_dtype"], f"{name} has dtype {q['dtype']}"
        assert q["kernel_err"] <= q["bound"], (
            f"{case} {name}: error {q['kernel_err']:.3e} > 2 x eager same-dtype error {q['torch_err']:.3e} + tol")


def test_memory_per_rank_scales_with_the_shard(report):
    """Peak RSS growth of fwd + bwd (torch path, fp32, entropy on), per rank of 2.
    Many tokens (N = 1024, V = 65536, D = 128): measured 34 MiB (dW shard + tiles), against 128 MiB for one
    [N, V / P] logits buffer. A large weight (N = 16, D = 1024): measured 136 MiB, against 264 MiB for the whole head
    on one rank, and below one (V, D) fp32 buffer, so no rank gathers the weight or its gradient."""
    m = report["cases"]["memory"]
    for grown in m["many_tokens_growth"]:
        assert grown < 0.5 * m["shard_logits_bytes"], m
    for grown in m["vp_growth"]:
        assert grown < 0.6 * m["one_growth"], m
        assert grown < m["full_weight_bytes"], m


def test_bad_layouts_raise_on_every_rank(report):
    errs = report["cases"]["errors"]
    assert all(e and "shards disagree" in e for e in errs["unequal_rows"]), errs
    assert all(e and "vocab_size must be an int in (8, 16]" in e for e in errs["vocab_size_too_big"]), errs


def test_single_process_argument_errors():
    h, w, t = torch.randn(3, 4), torch.randn(5, 4), torch.randint(0, 5, (3,))
    with pytest.raises(ValueError, match="vocab_size is only used with process_group"):
        dk.linear_logprob(h, w, t, vocab_size=5)
    with pytest.raises(ValueError, match="process_group needs impl"):
        dk.linear_logprob(h, w, t, impl="reference", process_group=object())
    with pytest.raises(ValueError, match="process_group needs impl"):
        dk.FusedLinearDPHLoss.preset("grpo", impl="reference", process_group=object())
    if not torch.distributed.is_initialized():
        with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
            dk.linear_logprob(h, w, t, process_group=object())
