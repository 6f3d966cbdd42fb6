"""The numerics contract (design.md): kernel error <= 2 x the same-dtype PyTorch error + tol, against float64 truth."""
import torch

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-3, torch.float64: 1e-10}


def max_err(a, b):
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def assert_contract(name, kernel, same_dtype, truth, dtype):
    """kernel / same_dtype / truth: tensors of one quantity (an output or a gradient)."""
    k_err, t_err = max_err(kernel, truth), max_err(same_dtype, truth)
    bound = 2 * t_err + TOL[dtype]
    assert k_err <= bound, f"{name}: kernel error {k_err:.3e} > 2 x torch {dtype} error {t_err:.3e} + tol"


def run_with_grads(fn, inputs, upstream):
    """Calls fn(*inputs) -> tensor or tuple; returns (outputs, grads of sum(out * g) w.r.t. inputs needing grad)."""
    leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) if x is not None else None for x in inputs]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    loss = sum((o.double() * g.double()).sum() for o, g in zip(outs, upstream))
    wrt = [x for x in leaves if x is not None and x.requires_grad]
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    grads = [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wrt)]
    return [o.detach() for o in outs], grads
