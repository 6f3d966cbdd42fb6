"""Providers: the implementations compared side by side, each included when it imports and applies, else skipped
with a printed reason.

    dph-triton   dph_kernels, impl="triton"                      (CUDA only)
    dph-torch    dph_kernels, impl="torch" (chunked PyTorch)
    eager        PyTorch, logits materialized, log_softmax in fp32 (benchmarks/ops.py)
    compile      torch.compile of the eager code
    liger        Liger-Kernel: LigerFusedLinearCrossEntropyLoss(reduction="none") for logprob (Triton, CUDA only),
                 chunked_loss.LigerFusedLinearGRPOLoss for grpo, chunked_loss.LigerFusedLinearJSDLoss for fdiv-js
    cce          Cut Cross-Entropy linear_cross_entropy(reduction="none") for logprob: impl="cce" on CUDA,
                 impl="torch_compile" elsewhere
    trl          TRL's chunked log-prob kernel (trl/kernels/chunked_logprob.py, what GRPOTrainer uses since 1.15) for
                 logprob and logprob-ent: Triton on CUDA, its torch tiles elsewhere
    verl         verl's FusedLinearForPPO (verl/utils/experimental/torch_functional.py, the model.use_fused_kernels
                 path's torch backend) for logprob and logprob-ent; verl lives in its own venv (.venv-verl)

Every provider's `make` returns a zero-argument forward closure whose result is the op's canonical output
(log-probs, not cross-entropies; see ops.py). `output_kind` says how that output relates to the eager one:
"same", or "mean" (a scalar mean over positions, e.g. Liger's JSD loss).
"""
from __future__ import annotations

import importlib
import importlib.metadata as md

import torch

from . import ops

BASELINES = ["eager", "compile", "liger", "cce", "trl", "verl"]
DPH = ["dph-triton", "dph-torch"]
ALL = DPH + BASELINES


def version_of(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _dph():
    import dph_kernels

    return dph_kernels


class Provider:
    name = ""

    def compiles(self, device: str) -> bool:
        """Whether the first call compiles (the harness gives it a time limit)."""
        return False

    def is_compiled_eager(self, device: str) -> bool:
        """Whether this is the eager math under torch.compile (its error check is skipped by default: another
        compilation for the same numbers as eager's)."""
        return False

    def unavailable(self, device: str) -> str | None:
        """None when the provider can run on this device, else the reason it cannot."""
        return None

    def unsupported(self, op: str, device: str) -> str | None:
        """None when the provider implements `op`, else the reason it does not."""
        return None

    def unsupported_case(self, op: str, inp) -> str | None:
        """Why this provider cannot run this case's inputs (e.g. a softcap it does not have), or None."""
        return None

    def output_kind(self, op: str) -> str:
        return "same"

    def make(self, op: str, inp: ops.Inputs, device: str):
        raise NotImplementedError

    def note(self, op: str, device: str) -> str:
        return ""


# ----------------------------------------------------------------------------------------------------------------------
# dph_kernels
# ----------------------------------------------------------------------------------------------------------------------

_DPH_API = {"logprob": "linear_logprob", "fused": "FusedLinearDPHLoss", "fdiv": "linear_f_divergence"}


def preset_config(preset: str, impl: str | None = None):
    """(loss_fn or None, cfg dict) for a dph preset; cfg holds the knobs the eager baseline needs, read from the
    preset object when dph_kernels exposes them, else the defaults of docs/method.md."""
    cfg = dict(ops.DEFAULT_PRESETS[preset])
    loss_fn = None
    try:
        dk = _dph()
        cls = dk.FusedLinearDPHLoss
    except (ImportError, AttributeError):
        return None, cfg
    try:
        loss_fn = cls.preset(preset, impl=impl) if impl else cls.preset(preset)
    except TypeError:  # preset() without keyword overrides
        loss_fn = cls.preset(preset)
        if impl:
            loss_fn.impl = impl
    src = getattr(loss_fn, "cfg", None) or getattr(loss_fn, "config", None)
    if src is not None and not isinstance(src, dict):
        src = getattr(src, "__dict__", {})
    src = src or getattr(loss_fn, "__dict__", {})
    for k in list(cfg) + ["kl_beta", "entropy_coef"]:
        if k in src:
            cfg[k] = src[k]
    return loss_fn, cfg


class DphProvider(Provider):
    def __init__(self, impl: str):
        self.impl = impl
        self.name = f"dph-{impl}"

    def unavailable(self, device):
        if self.impl == "triton" and device != "cuda":
            return "CUDA only (the Triton interpreter is for tests, not for timing)"
        try:
            _dph()
        except ImportError as e:
            return f"dph_kernels does not import: {e}"
        return None

    def unsupported(self, op, device):
        attr = _DPH_API[ops.FAMILY[op]]
        if not hasattr(_dph(), attr):
            return f"dph_kernels has no {attr} yet"
        return None

    def make(self, op, inp, device):
        dk, impl, fam = _dph(), self.impl, ops.FAMILY[op]
        if fam == "logprob":
            ent = op == "logprob-ent"
            return lambda: dk.linear_logprob(inp.hidden, inp.weight, inp.targets, return_entropy=ent, impl=impl,
                                             softcap=inp.softcap)
        if fam == "fdiv":
            kind, e = ops.FDIV_KIND[op], inp.extra
            return lambda: dk.linear_f_divergence(inp.hidden, inp.weight, e["ref_hidden"], e["ref_weight"],
                                                  kind=kind, impl=impl, softcap=inp.softcap,
                                                  ref_softcap=inp.softcap)
        loss_fn, _ = preset_config(ops.PRESET[op], impl)
        loss_fn.cfg["softcap"] = inp.softcap
        e = inp.extra
        return lambda: loss_fn(inp.hidden, inp.weight, inp.targets, e["loss_mask"], e["is_pef"],
                               advantages=e["advantages"], old_logp=e["old_logp"], ref_logp=e["ref_logp"]).loss


# ----------------------------------------------------------------------------------------------------------------------
# PyTorch eager and torch.compile
# ----------------------------------------------------------------------------------------------------------------------

def _eager_fn(op, softcap=None):
    """A function of tensors only (what torch.compile traces best)."""
    fam = ops.FAMILY[op]
    if fam == "logprob":
        ent = op == "logprob-ent"
        return lambda h, w, y: ops.eager_logprob(h, w, y, with_entropy=ent, softcap=softcap)
    if fam == "fdiv":
        kind = ops.FDIV_KIND[op]
        return lambda h, w, hr, wr: ops.eager_fdiv(h, w, hr, wr, kind, softcap)
    _, cfg = preset_config(ops.PRESET[op])

    def fused(h, w, y, mask, is_pef, adv, old, ref):
        B, T, D = h.shape
        logp = ops.eager_logprob(h.reshape(B * T, D), w, y.reshape(-1), temperature=cfg["temperature"],
                                 softcap=softcap).view(B, T)
        return ops.dph_loss_from_logp(logp, y, mask, is_pef, adv, old, ref, cfg)

    return fused


def _eager_args(op, inp):
    fam, e = ops.FAMILY[op], inp.extra
    if fam == "logprob":
        return (inp.hidden, inp.weight, inp.targets)
    if fam == "fdiv":
        return (inp.hidden, inp.weight, e["ref_hidden"], e["ref_weight"])
    return (inp.hidden, inp.weight, inp.targets, e["loss_mask"], e["is_pef"], e["advantages"], e["old_logp"],
            e["ref_logp"])


class EagerProvider(Provider):
    name = "eager"

    def make(self, op, inp, device):
        fn, args = _eager_fn(op, inp.softcap), _eager_args(op, inp)
        return lambda: fn(*args)


class CompileProvider(Provider):
    name = "compile"

    def compiles(self, device):
        return True

    def is_compiled_eager(self, device):
        return True

    def __init__(self):
        self._cache = {}

    def unavailable(self, device):
        if not hasattr(torch, "compile"):
            return "this torch has no torch.compile"
        return None

    def make(self, op, inp, device):
        key = (op, inp.softcap)
        if key not in self._cache:
            # torch's default (dynamic=None): specialized to the first shape, one dynamic-shape recompile after that.
            self._cache[key] = torch.compile(_eager_fn(op, inp.softcap))
        fn, args = self._cache[key], _eager_args(op, inp)
        return lambda: fn(*args)


# ----------------------------------------------------------------------------------------------------------------------
# Liger-Kernel
# ----------------------------------------------------------------------------------------------------------------------

LIGER_LOSS_TYPE = {"token-mean": "bnpo", "seq-mean-token-mean": "grpo", "seq-mean-token-sum-norm": "dr_grpo"}


class LigerProvider(Provider):
    name = "liger"

    def compiles(self, device):
        return device == "cuda"  # chunked losses torch.compile their loss math

    def unavailable(self, device):
        try:
            importlib.import_module("liger_kernel.chunked_loss")
        except Exception as e:  # noqa: BLE001 - any import failure means "not available"
            return f"liger-kernel does not import ({type(e).__name__}: {e}); pip install liger-kernel"
        return None

    def unsupported(self, op, device):
        if op == "logprob":
            if device != "cuda":
                return "LigerFusedLinearCrossEntropyLoss is Triton-only (needs CUDA)"
            return None
        if op == "grpo":
            _, cfg = preset_config("grpo")
            if cfg["loss_agg"] not in LIGER_LOSS_TYPE:
                return f"no Liger loss_type for loss_agg={cfg['loss_agg']}"
            return None
        if op == "fdiv-js":
            return None
        return "no Liger equivalent"

    def unsupported_case(self, op, inp):
        if inp.softcap is not None and op != "logprob":
            return f"Liger's chunked {op} loss has no softcap (the case has softcap={inp.softcap})"
        return None

    def output_kind(self, op):
        return "mean" if op == "fdiv-js" else "same"

    def note(self, op, device):
        compiled = device == "cuda"
        if op == "logprob":
            return "FLCE reduction=none; grads computed in forward"
        if op == "grpo":
            _, cfg = preset_config("grpo")
            dual = f"; no dual-clip (preset: {cfg['dual_clip']})" if cfg.get("dual_clip") else ""
            return f"chunked_loss GRPO compiled={compiled}; grads computed in forward{dual}"
        if op == "fdiv-js":
            return f"chunked_loss JSD beta=0.5 compiled={compiled}; scalar mean; grads in forward"
        return ""

    def make(self, op, inp, device):
        compiled = device == "cuda"  # the default; on CPU its torch.compile of the loss math takes ~20 s per shape
        if op == "logprob":
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            f = LigerFusedLinearCrossEntropyLoss(reduction="none", softcap=inp.softcap)
            return lambda: -f(inp.weight, inp.hidden, inp.targets)
        if op == "grpo":
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

            _, cfg = preset_config("grpo")
            lt = LIGER_LOSS_TYPE[cfg["loss_agg"]]
            B, T, _ = inp.hidden.shape
            f = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, compiled=compiled, loss_type=lt,
                                         epsilon_low=cfg["clip_low"], epsilon_high=cfg["clip_high"],
                                         temperature=cfg["temperature"],
                                         max_completion_length=T if lt == "dr_grpo" else None)
            e = inp.extra
            return lambda: f(inp.hidden, inp.weight, inp.targets, e["loss_mask"], e["advantages"],
                             old_per_token_logps=e["old_logp"])[0]
        if op == "fdiv-js":
            from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

            f = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.5, compiled=compiled)
            e = inp.extra
            return lambda: f(inp.hidden, inp.weight, e["ref_hidden"], e["ref_weight"], inp.targets)
        raise ValueError(op)


# ----------------------------------------------------------------------------------------------------------------------
# Cut Cross-Entropy
# ----------------------------------------------------------------------------------------------------------------------

class CCEProvider(Provider):
    name = "cce"

    def unavailable(self, device):
        try:
            importlib.import_module("cut_cross_entropy")
        except Exception as e:  # noqa: BLE001
            return f"cut-cross-entropy does not import ({type(e).__name__}: {e}); pip install cut-cross-entropy"
        return None

    def unsupported(self, op, device):
        return None if op == "logprob" else "CCE computes the target log-prob only"

    def compiles(self, device):
        return device != "cuda"  # impl="torch_compile": torch.compile of materialized logits

    def is_compiled_eager(self, device):
        return device != "cuda"

    def impl(self, device):
        return "cce" if device == "cuda" else "torch_compile"

    def note(self, op, device):
        return f"impl={self.impl(device)} reduction=none" + (" filter_eps=high (default)" if device == "cuda" else "")

    def make(self, op, inp, device):
        from cut_cross_entropy import linear_cross_entropy

        impl = self.impl(device)
        return lambda: -linear_cross_entropy(inp.hidden, inp.weight, inp.targets, reduction="none", impl=impl,
                                             softcap=inp.softcap)


# ----------------------------------------------------------------------------------------------------------------------
# TRL
# ----------------------------------------------------------------------------------------------------------------------

class TRLProvider(Provider):
    name = "trl"

    def unavailable(self, device):
        try:
            importlib.import_module("trl.kernels.chunked_logprob")
        except Exception as e:  # noqa: BLE001
            return f"trl's chunked log-prob kernel does not import ({type(e).__name__}: {e}); pip install 'dph[trl]'"
        return None

    def unsupported(self, op, device):
        return None if ops.FAMILY[op] == "logprob" else "TRL's kernel computes per-token log-probs / entropies only"

    def note(self, op, device):
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

        return (f"ChunkedLogProbFunction chunk_size={_CHUNKED_LOGPROB_CHUNK_SIZE} (GRPOTrainer's), trl {version_of('trl')}; "
                "applies the case's softcap (scale, cap, temperature: the order dk uses)")

    def make(self, op, inp, device):
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

        outputs = ("log_probs", "entropy") if op == "logprob-ent" else ("log_probs",)

        def fwd():
            lp, ent, *_ = ChunkedLogProbFunction.apply(inp.hidden, inp.weight, None, inp.targets, 1.0,
                                                       _CHUNKED_LOGPROB_CHUNK_SIZE, inp.softcap, 1.0, outputs)
            return (lp, ent) if op == "logprob-ent" else lp

        return fwd


class VerlProvider(Provider):
    name = "verl"
    CHUNK = 512  # FusedLinearForPPO's default token chunk

    def unavailable(self, device):
        try:
            importlib.import_module("verl.utils.experimental.torch_functional")
        except Exception as e:  # noqa: BLE001
            return (f"verl does not import ({type(e).__name__}: {e}); it needs its own venv: make test-verl, then "
                    "run the benchmark with .venv-verl/bin/python")
        return None

    def unsupported(self, op, device):
        return None if ops.FAMILY[op] == "logprob" else "FusedLinearForPPO computes log-probs and entropies only"

    def note(self, op, device):
        return f"FusedLinearForPPO(chunk_size={self.CHUNK}, impl_backend='torch'), verl {version_of('verl')}; " \
               "always computes the entropy"

    def make(self, op, inp, device):
        from verl.utils.experimental.torch_functional import FusedLinearForPPO

        f = FusedLinearForPPO(chunk_size=self.CHUNK, impl_backend="torch")

        def fwd():
            lp, ent = f(inp.hidden, inp.weight, inp.targets)
            return (lp, ent) if op == "logprob-ent" else lp

        return fwd


def all_providers() -> dict[str, Provider]:
    return {p.name: p for p in [DphProvider("triton"), DphProvider("torch"), EagerProvider(), CompileProvider(),
                                LigerProvider(), CCEProvider(), TRLProvider(), VerlProvider()]}
