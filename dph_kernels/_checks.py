"""Input validation shared by every public entry point: clear errors that name the argument, before any launch."""
from __future__ import annotations

import math
from numbers import Real

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
IMPLS = ("auto", "triton", "torch", "reference")


def check_tensor(name, x, *, ndim=None, min_ndim=None, dtypes=None, integer=False, floating=False, shape=None,
                 shape_of=None, device=None, device_of="hidden"):
    """The one check of a tensor argument: type, dimensions / exact shape, dtype kind, device. Errors name `name`
    (and `shape_of` / `device_of`, the argument the expected shape / device comes from)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if device is not None and x.device != device:
        raise ValueError(f"{name} is on {x.device} but {device_of} is on {device}; put all inputs on one device")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(x.shape)}")
    if min_ndim is not None and x.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(x.shape)}")
    if shape is not None and tuple(x.shape) != tuple(shape):
        of = f" ({shape_of}'s shape)" if shape_of else ""
        raise ValueError(f"{name} must have shape {tuple(shape)}{of}, got {tuple(x.shape)}")
    if integer and (x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor (e.g. torch.long), got {x.dtype}")
    if floating and not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {x.dtype}; expected one of {', '.join(str(d) for d in dtypes)}")
    return x


def check_mask(name, mask, *, shape, shape_of=None, device=None, device_of="hidden"):
    """A 0/1 selection: bool, or an integer / float tensor holding only 0 and 1 (a 0.5 is an error, not a 1).
    Returns it as bool. (A non-bool mask costs one reduction, which syncs on CUDA; under torch.compile the value check
    is skipped.)"""
    check_tensor(name, mask, shape=shape, shape_of=shape_of, device=device, device_of=device_of)
    if mask.dtype.is_complex:
        raise TypeError(f"{name} must be a bool, integer or float tensor of 0 / 1, got {mask.dtype}")
    if mask.dtype != torch.bool:
        if not torch.compiler.is_compiling() and not bool(((mask == 0) | (mask == 1)).all()):
            bad = mask[(mask != 0) & (mask != 1)].flatten()[0].item()
            raise ValueError(f"{name} must hold only 0 and 1 (or be bool), got {bad}")
        mask = mask != 0
    return mask


# A stored log-probability may exceed 0 by rounding only (bf16 / fp16 scoring, a sampler's own log-probs).
LOGP_TOLERANCE = 1e-3


def check_logprobs(name, logp, where=None):
    """Stored log-probabilities (e.g. old_logp, ref_logp) must be finite and <= LOGP_TOLERANCE at the positions in
    `where` (bool, logp's shape; default: everywhere); the error names the first bad position. One reduction (it
    syncs on CUDA)."""
    bad = ~(torch.isfinite(logp) & (logp <= LOGP_TOLERANCE))
    if where is not None:
        bad &= where
    if bool(bad.any()):
        pos = tuple(bad.nonzero()[0].tolist())
        raise ValueError(f"{name}{list(pos)} = {logp[pos].item():.6g}: a stored log-probability must be finite and "
                         f"<= 0 (up to {LOGP_TOLERANCE}); {int(bad.sum())} position(s) are not")
    return logp


def check_temperature(temperature):
    if isinstance(temperature, bool) or not isinstance(temperature, Real):
        raise TypeError(f"temperature must be a positive number, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return float(temperature)


def check_head(softcap, logit_scale, prefix=""):
    """softcap: None or a finite number > 0; logit_scale: a finite number > 0. Returns them as floats."""
    for name, value, optional in ((prefix + "softcap", softcap, True), (prefix + "logit_scale", logit_scale, False)):
        if value is None and optional:
            continue
        if isinstance(value, bool) or not isinstance(value, Real):
            raise TypeError(f"{name} must be {'None or ' if optional else ''}a positive number, "
                            f"got {type(value).__name__}")
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0{' (or None for no cap)' if optional else ''}, "
                             f"got {value}")
    return (None if softcap is None else float(softcap)), float(logit_scale)


def check_impl(impl):
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return impl


def resolve_impl(impl, device):
    """'auto' -> Triton on CUDA tensors, chunked torch elsewhere."""
    impl = check_impl(impl)
    if impl == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if impl == "triton" and not triton_available():
        raise RuntimeError("impl='triton' needs the triton package; install it or use impl='torch'")
    if impl == "triton" and device.type != "cuda" and not interpreter_on():
        raise ValueError(
            f"impl='triton' needs CUDA tensors (got device {device}); use impl='torch' on the CPU, or set "
            "TRITON_INTERPRET=1 before importing dph_kernels to run the kernels in Triton's interpreter")
    return impl


def interpreter_on():
    import os
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available():
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def check_targets_range(targets, vocab, ignore_index, name="targets"):
    """Every target is in [0, V) or equals ignore_index (one small reduction; it syncs on CUDA)."""
    valid = targets != ignore_index
    if not bool(valid.any()):
        return
    picked = targets[valid]
    lo, hi = int(picked.min()), int(picked.max())
    if lo < 0 or hi >= vocab:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} contains {bad}, outside [0, {vocab}) and not ignore_index={ignore_index}")


def check_linear_inputs(hidden, weight, targets, bias, *, allow_fp64, head="weight", hidden_name="hidden",
                        targets_name="targets", bias_name="bias", device=None, device_of="hidden", ndim=None):
    """Shapes, dtypes, devices of a (hidden, weight, targets, bias) linear-head problem. Returns (N, D, V).
    device / device_of: where hidden itself must live (a second head checked against the first); ndim: hidden's
    exact number of dimensions, if the caller needs one."""
    dtypes = FLOAT_DTYPES + ((torch.float64,) if allow_fp64 else ())
    check_tensor(hidden_name, hidden, ndim=ndim, min_ndim=1, dtypes=dtypes, device=device, device_of=device_of)
    device = hidden.device
    check_tensor(head, weight, ndim=2, dtypes=dtypes, device=device, device_of=hidden_name)
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{head} has dtype {weight.dtype} but {hidden_name} has {hidden.dtype}; they must match")
    D = hidden.shape[-1]
    if weight.shape[1] != D:
        raise ValueError(f"{head} must have shape (V, {D}) to match {hidden_name}'s last dimension D={D}, "
                         f"got {tuple(weight.shape)}")
    V = weight.shape[0]
    if V == 0 or D == 0:
        raise ValueError(f"{head} must be non-empty, got shape {tuple(weight.shape)}")
    if targets is not None:
        check_tensor(targets_name, targets, integer=True, device=device, device_of=hidden_name,
                     shape=hidden.shape[:-1], shape_of=f"{hidden_name}'s leading")
    if bias is not None:
        check_tensor(bias_name, bias, ndim=1, device=device, device_of=hidden_name)
        if bias.shape[0] != V:
            raise ValueError(f"{bias_name} must have shape ({V},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"{bias_name} has dtype {bias.dtype} but {hidden_name} has {hidden.dtype}; they must match")
    N = hidden.numel() // D
    if N == 0:
        raise ValueError(f"{hidden_name} is an empty batch (shape {tuple(hidden.shape)}); need at least one token")
    return N, D, V


def check_ref_head(hidden, V, ref_hidden, ref_weight, ref_bias, *, allow_fp64):
    """The reference head of an exact divergence against the policy head (hidden, V rows). Returns D_ref."""
    _, Dr, Vr = check_linear_inputs(ref_hidden, ref_weight, None, ref_bias, allow_fp64=allow_fp64, head="ref_weight",
                                    hidden_name="ref_hidden", bias_name="ref_bias", device=hidden.device)
    if tuple(ref_hidden.shape[:-1]) != tuple(hidden.shape[:-1]):
        raise ValueError(f"ref_hidden must have leading shape {tuple(hidden.shape[:-1])} (hidden's), "
                         f"got {tuple(ref_hidden.shape[:-1])}")
    if Vr != V:
        raise ValueError(f"ref_weight must have V={V} rows (weight's vocabulary), got {Vr}")
    if ref_hidden.dtype != hidden.dtype:
        raise TypeError(f"ref_hidden has dtype {ref_hidden.dtype} but hidden has {hidden.dtype}; they must match")
    return Dr
