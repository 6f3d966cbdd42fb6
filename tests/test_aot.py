"""Ahead-of-time compile of every Triton kernel for sm_90 (no GPU needed): the production rows compile, without
register spills, within shared memory, and the table reports a spill when there is one."""
import json
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


def test_sm90_bf16_production_rows_compile_spill_free(tmp_path):
    t0 = time.time()
    p = _run(["-m", "benchmarks.aot", "--arch", "sm_90", "--dtype", "bf16", "--json", str(tmp_path / "aot.json")],
             timeout=180)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = [line for line in p.stdout.splitlines() if "sm_90" in line]
    assert len(rows) == 17 and all(line.rstrip().endswith("ok") for line in rows), p.stdout
    assert sum("wgmma" in line for line in rows) == 16  # every GEMM kernel uses Hopper tensor cores
    table = json.loads((tmp_path / "aot.json").read_text())
    backward = [r for r in table if "dlogit" in r["kernel"]]
    assert len(backward) == 8 and all(r["atomics"] == 0 for r in backward)  # no atomic scatter anywhere
    assert time.time() - t0 < 180


def test_atomic_instructions_are_counted():
    # In a subprocess: importing benchmarks.aot switches the Triton interpreter off for the importing process.
    ptx = ("\tatom.global.add.f32 %f1, [%rd1], %f2;\n\t@%p3 red.global.add.f32 [%rd2], %f3;\n"
           "\t@!%p1 atom.shared.cas.b32 %r1, [%r2], %r3, %r4;\n\tbar.red.popc.u32 %r5, 0, %p2;\n"
           "\tredux.sync.add.u32 %r6, %r7, -1;\n\tld.global.f32 %f4, [%rd3];\n")
    p = _run(["-c", f"from benchmarks import aot; print(aot.atomic_count({ptx!r}))"], timeout=120)
    assert p.stdout.split()[-1] == "3", p.stdout + p.stderr


def test_a_spilling_config_is_reported():
    code = ("from benchmarks import aot\n"
            "c = [c for c in aot.cases() if c.kernel.endswith('_dlogit_kernel') and 'entropy=1' in c.variant][0]\n"
            "c.constexprs.update(BLOCK_N=128, BLOCK_V=128, BLOCK_D=64)\n"  # twice the rows: it spills
            "r = aot.compile_case(c, 90, 'bf16')\n"
            "print(r.status, r.spill_bytes, r.regs)\n")
    p = _run(["-c", code], timeout=120)
    status, spill, regs = p.stdout.split()[-3:]
    assert status == "spill" and int(spill) > 0 and int(regs) == 255, p.stdout + p.stderr


def test_roofline_floors_and_table():
    from benchmarks import roofline

    N, D, V = roofline.SHAPES["llama3-8b"]
    assert roofline.gemm_ms(N, D, V, 4) == pytest.approx(2 * 4 * N * D * V / 791.2e12 * 1e3)  # 43.5 ms
    for model, (N, D, V) in roofline.SHAPES.items():
        est = {(e.kernel, e.design): e for e in roofline.estimates(N, D, V)}
        fwd = est[("linear_logprob", "fwd")]
        assert fwd.flops == 2 * N * D * V and fwd.bound() == "tensor"
        for kernel, floor in (("linear_logprob", 4), ("fused loss", 4), ("js divergence", 8)):
            new, old = est[(kernel, "fwd+bwd vocab-chunks")], est[(kernel, "fwd+bwd atomics (old)")]
            assert new.atomic_bytes == 0 and new.n_gemms == floor
            # the bar: the default within 1.15x of its GEMM floor; nothing beats its own floor
            assert roofline.gemm_ms(N, D, V, floor) <= new.ms() <= 1.15 * roofline.gemm_ms(N, D, V, floor), model
            assert old.ms() > 2 * new.ms()
            # peak extra memory of the default backward: <= size(dW in bf16) + 512 MiB
            assert new.extra_bytes <= V * D * 2 + 512 * 2**20
    text = roofline.table()
    assert "gemma2-2b" in text and "js divergence" in text and "Predictions, not measurements" in text
