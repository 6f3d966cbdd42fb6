"""The benchmark harness (benchmarks/) on the CPU: a smoke run, its pieces, and pytest-benchmark timings.

`pytest --benchmark-only tests/test_bench_cpu.py` times the CPU paths (tiny shapes) so that regressions show;
under the default `--benchmark-disable` every benchmark body runs once, quickly.
"""
import csv
import importlib.util
import json
import math
import time

import pytest
import torch

from benchmarks import __main__ as bench_main
from benchmarks import gpu_check, measure, ops, providers, registry, report

# A tiny case: every path runs in milliseconds.
N, D, V = 96, 24, 300


# ----------------------------------------------------------------------------------------------------------------------
# The harness end to end
# ----------------------------------------------------------------------------------------------------------------------

def test_smoke_one_op_one_provider_writes_csv(tmp_path, capsys):
    t0 = time.time()
    rc = bench_main.main(["--shape", "64,32,128", "--ops", "logprob", "--providers", "eager", "--modes", "fwd+bwd",
                          "--mem", "inproc", "--out", str(tmp_path), "--tag", "smoke", "--no-plot", "--quiet",
                          "--cpu-budget", "0", "--min-reps", "1"])
    assert rc == 0
    assert time.time() - t0 < 10
    lines = (tmp_path / "smoke.csv").read_text().splitlines()
    assert lines[0].startswith("# dph benchmarks:")
    rows = list(csv.DictReader(lines[1:]))
    assert len(rows) == 1
    r = rows[0]
    assert (r["op"], r["provider"], r["mode"], r["status"]) == ("logprob", "eager", "fwd+bwd", "ok")
    assert float(r["ms"]) > 0 and float(r["ratio"]) == 1.0
    assert float(r["err_out"]) < 1e-4 and float(r["err_grad"]) < 1e-4
    meta = json.loads((tmp_path / "smoke.json").read_text())["meta"]
    assert meta["versions"]["torch"] and meta["date"] and meta["cpu"] is not None
    assert "eager" in capsys.readouterr().out


def test_missing_or_failing_provider_never_stops_the_run(tmp_path, monkeypatch):
    class Broken(providers.EagerProvider):
        name = "broken"

        def make(self, op, inp, device):
            def fail():
                raise RuntimeError("boom")
            return fail

    real = providers.all_providers
    monkeypatch.setattr(providers, "all_providers", lambda: {**real(), "broken": Broken()})
    cfg = bench_main.harness.Config(ops=["logprob"], shapes=[registry.Shape("custom", 32, 16, 64)],
                                    providers=["dph-triton", "broken", "eager"], modes=["fwd"], mem="none",
                                    cpu_budget_s=0, min_reps=1, verbose=False)
    rows = {r["provider"]: r for r in bench_main.harness.run(cfg)}
    assert rows["dph-triton"]["status"] == "skip" and "CUDA" in rows["dph-triton"]["reason"]
    assert rows["broken"]["status"] == "error" and "boom" in rows["broken"]["reason"]
    assert rows["eager"]["status"] == "ok"
    text = report.format_table(list(rows.values()))
    assert "broken" in text and "skipped:" in text


def test_cpu_peak_memory_in_a_fresh_subprocess():
    """The default CPU memory path: eager's fwd+bwd holds at least the fp32 [N, V] logits at once."""
    if measure.cpu_peak_supported():
        pytest.skip(measure.cpu_peak_supported())
    n, d, v = 512, 32, 4096  # logits: 8 MiB
    cfg = bench_main.harness.Config(ops=["logprob"], shapes=[registry.Shape("custom", n, d, v)],
                                    providers=["eager"], modes=["fwd", "fwd+bwd"], mem="subprocess",
                                    cpu_budget_s=0, min_reps=1, check_rows=0, verbose=False)
    rows = {r["mode"]: r for r in bench_main.harness.run(cfg)}
    logits_mb = n * v * 4 / 2**20
    assert rows["fwd"]["mem_mb"] >= 0.9 * logits_mb
    assert rows["fwd+bwd"]["mem_mb"] >= 0.9 * logits_mb
    assert rows["fwd+bwd"]["mem_mb"] < 20 * logits_mb


def test_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    rows = []
    for n in (64, 128):
        for prov, ms in (("eager", 2.0), ("dph-torch", 1.0)):
            rows.append(dict(op="logprob", model="smollm2-135m", N=n, D=576, V=49152, dtype="fp32", device="cpu",
                             provider=prov, mode="fwd+bwd", status="ok", ms=ms * n, mem_mb=float(n)))
    meta = report.machine_info("cpu")
    path = report.plot_rows(rows, meta, str(tmp_path / "p.png"))
    assert path and (tmp_path / "p.png").stat().st_size > 1000


# ----------------------------------------------------------------------------------------------------------------------
# Pieces
# ----------------------------------------------------------------------------------------------------------------------

def test_registry_and_shapes():
    assert registry.MODELS["llama3-8b"] == (4096, 128256)
    assert registry.MODELS["gemma2-2b"] == (2304, 256000)
    assert registry.parse_shape("4096,512,32768") == registry.Shape("custom", 4096, 512, 32768)
    with pytest.raises(ValueError):
        registry.parse_shape("1,2")
    shapes = registry.model_shapes(["smollm2-135m"], [2048, 4096])
    assert [(s.N, s.D, s.V) for s in shapes] == [(2048, 576, 49152), (4096, 576, 49152)]
    with pytest.raises(SystemExit):
        bench_main.main(["--ops", "nope"])
    cfg, tag = bench_main.config_from_args(bench_main.build_parser().parse_args(
        ["--device", "cpu", "--case", "gemma2-2b:8192", "--shape", "8,4,16"]))
    assert [(s.model, s.N, s.D, s.V) for s in cfg.shapes] == [("custom", 8, 4, 16), ("gemma2-2b", 8192, 2304, 256000)]
    assert tag == "cpu" and cfg.modes == ["fwd", "fwd+bwd"] and cfg.dtype == torch.float32
    cfg, _ = bench_main.config_from_args(bench_main.build_parser().parse_args(["--device", "cpu"]))
    assert [(s.N, s.D, s.V) for s in cfg.shapes] == [(4096, 512, 32768), (2048, 576, 49152)]


def test_eager_divergences_are_sane():
    inp = ops.make_inputs("fdiv-js", N, D, V, torch.float64, "cpu")
    e = inp.extra
    js = ops.eager_fdiv(inp.hidden, inp.weight, e["ref_hidden"], e["ref_weight"], "js")
    fkl = ops.eager_fdiv(inp.hidden, inp.weight, e["ref_hidden"], e["ref_weight"], "fkl")
    assert (js >= -1e-12).all() and (js <= math.log(2) + 1e-12).all()
    assert (fkl >= -1e-12).all()
    same = ops.eager_fdiv(inp.hidden, inp.weight, inp.hidden, inp.weight, "js")
    assert float(same.detach().abs().max()) < 1e-12
    # generators: finite values and gradients for log-ratios in +-50
    lr = torch.linspace(-50, 50, 101, dtype=torch.float64, requires_grad=True)
    for g in ops.GENERATORS.values():
        val = g(lr)
        val.sum().backward()
        assert torch.isfinite(val).all() and torch.isfinite(lr.grad).all()
        lr.grad = None


@pytest.mark.parametrize("op", ["grpo", "dph-js"])
def test_eager_baseline_is_the_same_loss_as_dph(op):
    """The eager baseline must compute what the dph preset computes, or the comparison is meaningless."""
    inp = ops.make_inputs(op, 4 * 16, D, V, torch.float64, "cpu", seq_len=16)
    loss_fn, cfg = providers.preset_config(ops.PRESET[op], "reference")
    e = inp.extra
    want = loss_fn(inp.hidden, inp.weight, inp.targets, e["loss_mask"], e["is_pef"], advantages=e["advantages"],
                   old_logp=e["old_logp"], ref_logp=e["ref_logp"]).loss
    got = ops.eager_forward(op, inp, cfg)
    # the fused loss keeps its per-token math in fp32 even for fp64 inputs
    got, want = float(got.detach()), float(want.detach())
    assert abs(got - want) <= 1e-6 * abs(got) + 1e-9


@pytest.mark.parametrize("op", ["logprob", "logprob-ent", "grpo", "dph-js", "fdiv-fkl", "fdiv-js"])
def test_error_check_of_every_applicable_cpu_provider(op):
    provs = providers.all_providers()
    ref = measure.Reference()
    inp = ops.make_inputs(op, 64, D, V, torch.float32, "cpu", seq_len=32)
    _, cfg = providers.preset_config(ops.PRESET[op]) if op in ops.PRESET else (None, None)
    checked = 0
    for name in ("dph-torch", "eager", "liger", "trl", "verl"):
        p = provs[name]
        if p.unavailable("cpu") or p.unsupported(op, "cpu"):
            continue
        e_out, e_grad = measure.error_vs_reference(p, op, inp, "cpu", 32, ref, op, cfg)
        assert e_out < 1e-4 and e_grad < 1e-4, (name, e_out, e_grad)
        checked += 1
    assert checked >= 1


def test_gpu_check_rehearsal_pieces(tmp_path):
    smoke = gpu_check._smoke(["benchmarks", "--device", "cuda", "--dtype", "bf16", "--ops", "logprob", "--case",
                              "llama3-8b:8192"])
    assert "cuda" not in smoke and "llama3-8b:8192" not in smoke and smoke[-1] == "--no-plot"
    assert gpu_check._smoke(["pytest", "tests"]) == ["pytest", "tests"]
    res = tmp_path / "results"
    res.mkdir()
    rows = [dict(op="logprob", model="llama3-8b", N=8192, D=4096, V=128256, mode="fwd+bwd", provider=p, status="ok",
                 ms=ms, mem_mb=mem, ratio=ratio, dw_mb=1002.0) for p, ms, mem, ratio in
            (("dph-triton", 10.0, 1050.0, 0.5), ("eager", 20.0, 9000.0, 1.0))]
    rows.append(dict(op="logprob", model="llama3-8b", N=8192, D=4096, V=128256, mode="fwd+bwd", provider="cce",
                     status="error", reason="boom"))
    (res / "gpu_logprob.json").write_text(json.dumps(dict(meta={}, rows=rows)))
    text = "\n".join(gpu_check.short_table(str(tmp_path), ["gpu_logprob", "gpu_fused"]))
    assert "time ok, mem ok" in text and "cce" in text and "gpu_fused: no results" in text


# ----------------------------------------------------------------------------------------------------------------------
# pytest-benchmark: the CPU paths at tiny shapes (`pytest --benchmark-only` to time them)
# ----------------------------------------------------------------------------------------------------------------------

def _fwd_bwd(provider, op, n=256, d=64, v=2048, seq_len=64):
    inp = ops.make_inputs(op, n, d, v, torch.float32, "cpu", seq_len=seq_len)
    fwd = providers.all_providers()[provider].make(op, inp, "cpu")

    def run():
        inp.zero_grad()
        measure.backward(inp, fwd())
        return inp.hidden.grad

    return run


@pytest.mark.parametrize("provider", ["dph-torch", "eager"])
@pytest.mark.parametrize("op", ["logprob", "logprob-ent", "grpo", "dph-js"])
def test_bench_logprob_and_fused_loss(benchmark, provider, op):
    grad = benchmark(_fwd_bwd(provider, op))
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("op", ["fdiv-fkl", "fdiv-js"])
def test_bench_linear_f_divergence(benchmark, op):
    grad = benchmark(_fwd_bwd("dph-torch", op))
    assert torch.isfinite(grad).all()


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel not installed")
def test_bench_liger_grpo_cpu(benchmark):
    grad = benchmark(_fwd_bwd("liger", "grpo"))
    assert torch.isfinite(grad).all()


def test_a_run_without_out_leaves_the_committed_results_alone(monkeypatch, capsys):
    """No --out: the results go to a fresh runs/bench/<tag>_<time> folder (git-ignored), never benchmarks/results;
    `git status` of the checkout is the same before and after."""
    import os
    import shutil
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isdir(os.path.join(root, ".git")) and not os.path.isfile(os.path.join(root, ".git")):
        pytest.skip("not a git checkout")

    def status():
        return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=root,
                              capture_output=True, text=True, check=True).stdout

    monkeypatch.chdir(root)
    before = status()
    committed = {f: os.path.getmtime(os.path.join(bench_main.RESULTS, f)) for f in os.listdir(bench_main.RESULTS)}
    args = ["--shape", "64,32,128", "--ops", "logprob", "--providers", "eager", "--modes", "fwd", "--mem", "none",
            "--no-plot", "--quiet", "--cpu-budget", "0", "--min-reps", "1", "--check-rows", "0"]
    written = []
    try:
        for _ in range(2):  # two runs in the same second still get two folders
            assert bench_main.main(args) == 0
            line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("wrote ")][-1]
            written.append(os.path.dirname(line.split()[1].rstrip(",")))
        assert status() == before
        for w in written:
            rel = os.path.relpath(os.path.abspath(w), root)
            assert rel.startswith(os.path.join("runs", "bench", "cpu_")), rel
            assert os.path.exists(os.path.join(w, "cpu.csv"))
        assert written[0] != written[1]
        assert {f: os.path.getmtime(os.path.join(bench_main.RESULTS, f))
                for f in os.listdir(bench_main.RESULTS)} == committed
    finally:
        for w in written:
            shutil.rmtree(w, ignore_errors=True)
