"""Ahead-of-time compile checks of every Triton kernel in dph_kernels, without a GPU.

    python -m benchmarks.aot [--arch sm_90,sm_80] [--dtype bf16,fp32] [--rows production|all] [--json out.json]

Each row compiles one kernel with the signature its launcher passes (pointer dtypes, int / float scalars) and the
constexprs and launch options (num_warps, num_stages) the launcher picks on a GPU (linear_logprob_triton._config),
for every variant a launch can take (entropy on/off, softcap on/off; divergences at one kind, since KIND only swaps
elementwise formulas). Triton builds PTX and a cubin with the ptxas in its wheel; `cuobjdump --dump-resource-usage`
(beside ptxas) gives registers per thread, the stack (nonzero = register spills to local memory) and static shared
memory; Triton's metadata gives the dynamic shared memory it allocates. "mma" says whether the PTX uses tensor
cores: wgmma (Hopper), or mma.sync (Ampere-style, also legal on Hopper).

Exits non-zero if any row failed to compile, spills, or needs more shared memory than the architecture has, so a
CI test can run it (tests/test_aot.py: sm_90 bf16 production rows).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

os.environ["TRITON_INTERPRET"] = "0"  # before dph_kernels' kernels are decorated: compile them, don't interpret
if "DPH_AOT_KEEP_CACHE" not in os.environ:  # a fresh cache, so the compile seconds are real compiles
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="dph-aot-")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

# Shared memory per block an SM can give (opt-in maximum): H100/H200 227 KiB, A100 163 KiB.
SMEM_LIMIT = {90: 232448, 80: 166912}
DTYPES = {"bf16": "bf16", "fp32": "fp32", "fp16": "fp16"}

# Argument kinds by name, shared by all kernels (the launchers' conventions).
INPUT_PTRS = {"H", "W", "Bias", "Hr", "Wr", "BiasR", "dZ", "dZr"}  # the model's dtype (dlogit chunks too)
I64_PTRS = {"Targets"}
I8_PTRS = {"Valid", "IsPef", "Flags"}
INTS = {"N", "V", "D", "Dr", "v_per_split", "n", "v0", "v1", "stride_dz"}
FLOATS = {"inv_temp", "post", "pre", "post_r", "pre_r", "alpha", "clip_low", "clip_high", "dual_clip", "kl_beta",
          "clamp_lo", "clamp_hi"}


@dataclass
class Case:
    kernel: str  # module.function
    variant: str
    constexprs: dict
    num_warps: int
    num_stages: int
    production: bool = True


@dataclass
class Row:
    kernel: str
    variant: str
    config: str
    arch: str
    dtype: str
    regs: int | None = None
    spill_bytes: int | None = None
    smem: int | None = None
    mma: str = ""
    atomics: int | None = None
    compile_s: float = 0.0
    status: str = "ok"
    reason: str = ""
    extra: dict = field(default_factory=dict)


def _kernels():
    from dph_kernels import linear_divergence_triton as dv
    from dph_kernels import linear_logprob_triton as lp
    from dph_kernels import token_loss_triton as tl_
    return {"linear_logprob._forward_kernel": lp._forward_kernel,
            "linear_logprob._dlogit_kernel": lp._dlogit_kernel,
            "linear_divergence._lse2_kernel": dv._lse2_kernel,
            "linear_divergence._div_kernel": dv._div_kernel,
            "linear_divergence._div_dlogit_kernel": dv._div_dlogit_kernel,
            "token_loss._token_loss_kernel": tl_._token_loss_kernel}


# Candidate configs for --rows all (BLOCK_N, BLOCK_V, BLOCK_D, warps, stages), next to the production ones.
CANDIDATES = [(64, 128, 64, 8, 3), (64, 128, 32, 8, 2), (64, 64, 32, 8, 3), (64, 64, 16, 8, 2), (32, 64, 32, 4, 2),
              (128, 64, 64, 8, 3)]


def cases(rows="production", dtype="bf16"):
    """Every variant the launchers can compile, at the GPU configs they pick for dtype
    (linear_logprob_triton.GPU_CONFIGS); rows='all' adds CANDIDATES."""
    from dph_kernels.linear_logprob_triton import GPU_CONFIGS
    key = "fp32" if dtype == "fp32" else "bf16"
    families = ("logprob_fwd", "logprob_bwd", "div_lse", "div", "div_bwd")
    prod = {f: GPU_CONFIGS[(f, key)] for f in families}
    configs = [(prod, True)]
    if rows == "all":
        configs += [({f: c for f in families}, False) for c in CANDIDATES]
    common = dict(UPCAST=False, HAS_BIAS=False)
    out = []
    for per_family, is_prod in configs:
        tl_ = {f: dict(BLOCK_N=c[0], BLOCK_V=c[1], BLOCK_D=c[2]) for f, c in per_family.items()}
        ws = {f: (c[3], c[4]) for f, c in per_family.items()}
        out += _variants(tl_, ws, common, is_prod)
    out.append(Case("token_loss._token_loss_kernel", "js kl clamp dual",
                    dict(KIND=2, HAS_DIV=True, KL_EST=3, HAS_KL=True, HAS_DUAL=True, HAS_CLAMP=True, BLOCK=1024), 4,
                    3, True))
    return out


def _variants(t, ws, common, prod):
    out = []
    for cap in (False, True):
        for ent in (False, True):
            out.append(Case("linear_logprob._forward_kernel", f"entropy={int(ent)} softcap={int(cap)}",
                            dict(common, WITH_ENTROPY=ent, SOFTCAP=cap, **t["logprob_fwd"]), *ws["logprob_fwd"],
                            prod))
            out.append(Case("linear_logprob._dlogit_kernel", f"entropy={int(ent)} softcap={int(cap)}",
                            dict(common, WITH_ENTROPY=ent, GROUP=8, SOFTCAP=cap, **t["logprob_bwd"]),
                            *ws["logprob_bwd"], prod))
        div = dict(common, HAS_RBIAS=False, SOFTCAP=cap, SOFTCAP_R=cap)
        out.append(Case("linear_divergence._lse2_kernel", f"softcap={int(cap)}", dict(div, **t["div_lse"]),
                        *ws["div_lse"], prod))
        out.append(Case("linear_divergence._div_kernel", f"js softcap={int(cap)}",
                        dict(div, KIND=2, **t["div"]), *ws["div"], prod))
        out.append(Case("linear_divergence._div_dlogit_kernel", f"js softcap={int(cap)}",
                        dict(div, KIND=2, NEED_REF=False, GROUP=8, **t["div_bwd"]), *ws["div_bwd"], prod))
        out.append(Case("linear_divergence._div_dlogit_kernel", f"js ref-grad softcap={int(cap)}",
                        dict(div, KIND=2, NEED_REF=True, GROUP=8, **t["div_bwd"]), *ws["div_bwd"], prod))
    return out


def signature(fn, constexprs, dtype):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in INPUT_PTRS:
            sig[name] = "*" + dtype
        elif name in I64_PTRS:
            sig[name] = "*i64"
        elif name in I8_PTRS:
            sig[name] = "*i8"
        elif name in INTS:
            sig[name] = "i32"
        elif name in FLOATS:
            sig[name] = "fp32"
        else:
            sig[name] = "*fp32"  # outputs, statistics, upstream gradients: fp32
    return sig


def _tool(name):
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def resource_usage(cubin: bytes):
    """(registers, stack bytes, static shared bytes) from cuobjdump --dump-resource-usage."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    get = lambda key: int(m.group(1)) if (m := re.search(key + r":(\d+)", text)) else None  # noqa: E731
    return get("REG"), get("STACK"), get("SHARED")


def compile_case(case: Case, arch: int, dtype: str, fns=None) -> Row:
    fns = fns or _kernels()
    fn = fns[case.kernel]
    tiles = {k: v for k, v in case.constexprs.items() if k.startswith("BLOCK_")}
    config = " ".join(f"{k[6:]}={v}" for k, v in tiles.items()) + f" w={case.num_warps} s={case.num_stages}"
    row = Row(case.kernel, case.variant, config, f"sm_{arch}", dtype)
    constexprs = dict(case.constexprs)
    if "DOT_PRECISION" in fn.arg_names:
        constexprs["DOT_PRECISION"] = "ieee" if dtype == "fp32" else "tf32"  # as dot_precision() picks
    t0 = time.time()
    try:
        src = ASTSource(fn=fn, signature=signature(fn, constexprs, dtype), constexprs=constexprs)
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": case.num_warps, "num_stages": case.num_stages})
        row.compile_s = time.time() - t0
        regs, stack, static_smem = resource_usage(k.asm["cubin"])
        ptx = k.asm["ptx"]
        row.regs, row.spill_bytes = regs, stack
        row.smem = int(k.metadata.shared) + int(static_smem or 0)
        row.mma = "wgmma" if "wgmma" in ptx else ("mma.sync" if "mma.sync" in ptx else "-")
        row.atomics = atomic_count(ptx)
        if row.atomics and case.kernel in ATOMIC_FREE:
            row.status, row.reason = "atomics", f"{row.atomics} atom./red. instructions in a backward kernel"
        elif stack:
            row.status, row.reason = "spill", f"{stack} B stack (register spills)"
        elif row.smem > SMEM_LIMIT[arch]:
            row.status, row.reason = "smem", f"{row.smem} B > {SMEM_LIMIT[arch]} B"
    except Exception as e:  # noqa: BLE001 - a failed compile is a row, not a crash
        row.compile_s = time.time() - t0
        row.status, row.reason = "fail", f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    return row


# The backward kernels write each gradient element once (no atomic scatter: bitwise-repeatable gradients); a row
# of theirs with an atomic instruction fails.
ATOMIC_FREE = {"linear_logprob._dlogit_kernel", "linear_divergence._div_dlogit_kernel"}
_ATOMIC = re.compile(r"^\s*(?:@!?%p\d+\s+)?(?:atom|red)\.", re.MULTILINE)


def atomic_count(ptx: str) -> int:
    """Atomic read-modify-write instructions in PTX: `atom.*` and `red.*` (not barrier reductions `bar.red`)."""
    return len(_ATOMIC.findall(ptx))


def table(rows) -> str:
    head = ["kernel", "variant", "config", "arch", "dtype", "regs", "spill B", "smem B", "mma", "atomics",
            "compile s", "status"]
    body = [[r.kernel, r.variant, r.config, r.arch, r.dtype, str(r.regs), str(r.spill_bytes), str(r.smem), r.mma,
             str(r.atomics), f"{r.compile_s:.1f}", r.status + (f" ({r.reason})" if r.reason else "")] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(b) for b in body])


def run(archs, dtypes, rows="production", log=print):
    fns = _kernels()
    out = []
    for arch in archs:
        for dtype in dtypes:
            for case in cases(rows, dtype):
                if case.kernel.startswith("token_loss") and dtype != dtypes[0]:
                    continue  # fp32 in, whatever the model's dtype
                r = compile_case(case, arch, dtype if not case.kernel.startswith("token_loss") else "fp32", fns)
                log(f"  {r.kernel} [{r.variant}] {r.config} sm_{arch} {r.dtype}: regs={r.regs} "
                    f"spill={r.spill_bytes} smem={r.smem} {r.mma} atomics={r.atomics} {r.compile_s:.1f}s {r.status}",
                    flush=True)
                out.append(r)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sm_90", help="comma list: sm_90,sm_80")
    ap.add_argument("--dtype", default="bf16", help="comma list: bf16,fp32,fp16")
    ap.add_argument("--rows", default="production", choices=["production", "all"])
    ap.add_argument("--json", default=None, help="also write the rows here")
    a = ap.parse_args(argv)
    archs = [int(x.strip().removeprefix("sm_")) for x in a.arch.split(",")]
    for arch in archs:
        if arch not in SMEM_LIMIT:
            raise SystemExit(f"--arch: unknown sm_{arch}; known: {', '.join(f'sm_{k}' for k in SMEM_LIMIT)}")
    dtypes = [x.strip() for x in a.dtype.split(",")]
    for d in dtypes:
        if d not in DTYPES:
            raise SystemExit(f"--dtype: unknown {d!r}; known: {', '.join(DTYPES)}")
    t0 = time.time()
    rows = run(archs, dtypes, a.rows, log=lambda *x, **k: print(*x, file=sys.stderr, **k))
    print(table(rows))
    bad = [r for r in rows if r.status != "ok"]
    prod_bad = [r for r, c in zip(rows, _row_cases(archs, dtypes, a.rows)) if r.status != "ok" and c.production]
    print(f"\n{len(rows)} compiles in {time.time() - t0:.0f} s; {len(bad)} not ok "
          f"({len(prod_bad)} at the production config)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    return 1 if prod_bad else 0


def _row_cases(archs, dtypes, rows):
    out = []
    for _ in archs:
        for dtype in dtypes:
            for case in cases(rows, dtype):
                if case.kernel.startswith("token_loss") and dtype != dtypes[0]:
                    continue
                out.append(case)
    return out


if __name__ == "__main__":
    sys.exit(main())
