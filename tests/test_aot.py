"""Ahead-of-time compile of every Triton kernel for sm_90 (no GPU needed): the production rows compile, without
register spills, within shared memory, and the table reports a spill when there is one."""
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytest.importorskip("triton")


def _run(args, timeout):
    env = dict(os.environ, TRITON_INTERPRET="0")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_sm90_bf16_production_rows_compile_spill_free():
    t0 = time.time()
    p = _run(["-m", "benchmarks.aot", "--arch", "sm_90", "--dtype", "bf16"], timeout=180)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = [line for line in p.stdout.splitlines() if "sm_90" in line]
    assert len(rows) == 15 and all(line.rstrip().endswith("ok") for line in rows), p.stdout
    assert sum("wgmma" in line for line in rows) == 14  # every GEMM kernel uses Hopper tensor cores
    assert time.time() - t0 < 180


def test_a_spilling_config_is_reported():
    code = ("from benchmarks import aot\n"
            "c = [c for c in aot.cases() if c.kernel.endswith('_backward_kernel') and 'entropy=1' in c.variant][0]\n"
            "c.constexprs.update(BLOCK_N=64, BLOCK_V=128, BLOCK_D=64)\n"  # the earlier config: it spills
            "r = aot.compile_case(c, 90, 'bf16')\n"
            "print(r.status, r.spill_bytes, r.regs)\n")
    p = _run(["-c", code], timeout=120)
    status, spill, regs = p.stdout.split()[-3:]
    assert status == "spill" and int(spill) > 0 and int(regs) == 255, p.stdout + p.stderr


def test_roofline_floors_and_table():
    from benchmarks import roofline

    N, D, V = roofline.SHAPES["llama3-8b"]
    assert roofline.gemm_ms(N, D, V, 4) == pytest.approx(2 * 4 * N * D * V / 791.2e12 * 1e3)  # 43.5 ms
    est = {(e.kernel, e.design): e for e in roofline.estimates(N, D, V)}
    fwd = est[("linear_logprob", "fwd")]
    assert fwd.flops == 2 * N * D * V and fwd.bound() == "tensor"
    chunked = est[("linear_logprob", "fwd+bwd chunked-cublas")]
    assert chunked.ms() >= roofline.gemm_ms(N, D, V, 4) - 1e-9  # nothing beats its own floor
    text = roofline.table()
    assert "gemma2-2b" in text and "js divergence" in text and "Predictions, not measurements" in text
