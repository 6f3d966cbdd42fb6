"""Exact f-divergence over the whole vocabulary between two linear heads, without [tokens x vocab] buffers.

    D_f(t) = sum_v q_v f(p_v / q_v),  p = softmax((h W^T + b) / T),  q = softmax((h_r W_r^T + b_r) / T)

With r_v = log p_v - log q_v and phi_v = q_v u_v f'(u_v) (reference.f_generator's derivative in r, weighted by q):
    dD/dz_v   = phi_v - p_v C,                  C = sum_v phi_v
    dD/dz_r,v = q_v f(u_v) - phi_v - q_v (D - C)     (only when ref_requires_grad)

Chunked torch path: rows in chunks; forward under no_grad, backward recomputes the chunk's logits and lets autograd
differentiate reference.f_generator locally (so the torch form of the math exists once). Triton path: see
linear_divergence_triton.py.
"""
from __future__ import annotations

import torch

from . import _checks
from . import reference as ref
from .losses import _check_kind

# [rows, V] buffer budget for the chunked path: the generator and its local autograd hold ~a dozen buffers of that
# size at once (4 MiB: 212 MiB peak extra at N=2048, D=512, V=32768 fp32, 8% of the reference; 8 MiB: 360 MiB).
CHUNK_BYTES = 4 * 2**20


def _chunk_rows(V):
    return max(1, CHUNK_BYTES // (V * 4))


def _chunk_logits(h, weight, bias, rh, rweight, rbias, inv_temp, cdt):
    """Both heads' scaled logits for a chunk of rows, fp32 / fp64."""
    z = ref.scaled_logits(h, weight, bias, 1.0).to(cdt) * inv_temp
    zr = ref.scaled_logits(rh, rweight, rbias, 1.0).to(cdt) * inv_temp
    return z, zr


def _div_from_logits(z, zr, kind, alpha):
    log_p = torch.log_softmax(z, -1)
    log_q = torch.log_softmax(zr, -1)
    return ref.f_generator(log_p - log_q, kind, alpha, log_weight=log_q).sum(-1)


def torch_forward(h, weight, bias, rh, rweight, rbias, valid, inv_temp, kind, alpha):
    N, V = h.shape[0], weight.shape[0]
    cdt = torch.float64 if h.dtype == torch.float64 else torch.float32
    out = torch.empty(N, dtype=cdt, device=h.device)
    step = _chunk_rows(V)
    with torch.no_grad():
        for r0 in range(0, N, step):
            sl = slice(r0, min(N, r0 + step))
            z, zr = _chunk_logits(h[sl], weight, bias, rh[sl], rweight, rbias, inv_temp, cdt)
            out[sl] = _div_from_logits(z, zr, kind, alpha)
    return torch.where(valid, out, torch.zeros_like(out))


def torch_backward(h, weight, bias, rh, rweight, rbias, valid, g, inv_temp, kind, alpha, need_ref):
    N, V = h.shape[0], weight.shape[0]
    cdt = torch.float64 if h.dtype == torch.float64 else torch.float32
    g = torch.where(valid, g.to(cdt), torch.zeros((), dtype=cdt, device=h.device))
    dh, dW = torch.zeros_like(h), torch.zeros(weight.shape, dtype=cdt, device=h.device)
    db = torch.zeros(V, dtype=cdt, device=h.device) if bias is not None else None
    if need_ref:
        drh, drW = torch.zeros_like(rh), torch.zeros(rweight.shape, dtype=cdt, device=h.device)
        drb = torch.zeros(V, dtype=cdt, device=h.device) if rbias is not None else None
    step = _chunk_rows(V)
    for r0 in range(0, N, step):
        sl = slice(r0, min(N, r0 + step))
        vmask = valid[sl, None]
        with torch.no_grad():
            z, zr = _chunk_logits(h[sl], weight, bias, rh[sl], rweight, rbias, inv_temp, cdt)
        z.requires_grad_()
        zr.requires_grad_(need_ref)
        with torch.enable_grad():
            div = _div_from_logits(z, zr, kind, alpha)
            grads = torch.autograd.grad(div, [z, zr] if need_ref else [z], grad_outputs=g[sl])
        # d loss / d raw logits, ignored rows zeroed by where (their NaNs stay out)
        dz = torch.where(vmask, grads[0] * inv_temp, 0.0)
        hc = torch.where(vmask, h[sl], 0.0)
        dh[sl] = dz.to(h.dtype) @ weight
        dW.addmm_(dz.T, hc.to(cdt))
        if db is not None:
            db += dz.sum(0)
        if need_ref:
            dzr = torch.where(vmask, grads[1] * inv_temp, 0.0)
            drh[sl] = dzr.to(rh.dtype) @ rweight
            drW.addmm_(dzr.T, torch.where(vmask, rh[sl], 0.0).to(cdt))
            if drb is not None:
                drb += dzr.sum(0)
    out = [dh, dW.to(weight.dtype), None if db is None else db.to(bias.dtype)]
    if need_ref:
        out += [drh, drW.to(rweight.dtype), None if drb is None else drb.to(rbias.dtype)]
    else:
        out += [None, None, None]
    return out


class LinearFDivergenceFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, rh, rweight, rbias, valid, inv_temp, kind, alpha, impl):
        if impl == "triton":
            from . import linear_divergence_triton as tk
            div, stats = tk.forward(h, weight, bias, rh, rweight, rbias, valid, inv_temp, kind, alpha)
        else:
            div, stats = torch_forward(h, weight, bias, rh, rweight, rbias, valid, inv_temp, kind, alpha), None
        ctx.save_for_backward(h, weight, bias, rh, rweight, rbias, valid, div, *(stats or ()))
        ctx.args = (inv_temp, kind, alpha, impl)
        return div

    @staticmethod
    def backward(ctx, g):
        h, weight, bias, rh, rweight, rbias, valid, div, *stats = ctx.saved_tensors
        inv_temp, kind, alpha, impl = ctx.args
        need_ref = any(ctx.needs_input_grad[3:6])
        if impl == "triton":
            from . import linear_divergence_triton as tk
            grads = tk.backward(h, weight, bias, rh, rweight, rbias, valid, div, stats, g, inv_temp, kind, alpha,
                                need_ref)
        else:
            grads = torch_backward(h, weight, bias, rh, rweight, rbias, valid, g, inv_temp, kind, alpha, need_ref)
        return (*grads, None, None, None, None, None)


def linear_f_divergence(hidden, weight, ref_hidden, ref_weight, *, kind="fkl", alpha=0.5, bias=None, ref_bias=None,
                        temperature=1.0, mask=None, ref_requires_grad=False, impl="auto"):
    """Per-position exact D_f(pi_theta || pi_ref) between softmax(hidden W^T + b)/T and softmax(ref_hidden W_ref^T
    + b_ref)/T, summed over the whole vocabulary, without [tokens x vocab] buffers.

    Args:
        hidden (..., D), weight (V, D), bias (V,): the policy head. Differentiable.
        ref_hidden (..., D_ref), ref_weight (V, D_ref), ref_bias: the reference head (D_ref may differ from D).
            Constant unless ref_requires_grad=True.
        kind: as dk.f_divergence ("fkl", "fkl_k1" (equal to "fkl" here), "js", "alpha", "rkl", "tv", "hellinger").
        mask: optional bool (...); masked-out positions give 0 and no gradient.
        impl: "auto" | "triton" | "torch" | "reference".
    Returns: fp32 (...).
    """
    _check_kind(kind, alpha)
    allow64 = impl in ("torch", "reference")
    N, D, V = _checks.check_linear_inputs(hidden, weight, None, bias, allow_fp64=allow64)
    Nr, Dr, Vr = _checks.check_linear_inputs(ref_hidden, ref_weight, None, ref_bias, allow_fp64=allow64,
                                             head="ref_weight", hidden_name="ref_hidden", bias_name="ref_bias")
    if ref_hidden.device != hidden.device:
        raise ValueError(f"ref_hidden is on {ref_hidden.device} but hidden is on {hidden.device}")
    if tuple(ref_hidden.shape[:-1]) != tuple(hidden.shape[:-1]):
        raise ValueError(f"ref_hidden must have leading shape {tuple(hidden.shape[:-1])} (hidden's), "
                         f"got {tuple(ref_hidden.shape[:-1])}")
    if Vr != V:
        raise ValueError(f"ref_weight must have V={V} rows (weight's vocabulary), got {Vr}")
    if ref_hidden.dtype != hidden.dtype:
        raise TypeError(f"ref_hidden has dtype {ref_hidden.dtype} but hidden has {hidden.dtype}; they must match")
    lead = hidden.shape[:-1]
    if mask is None:
        mask = torch.ones(lead, dtype=torch.bool, device=hidden.device)
    _checks.check_tensor("mask", mask, device=hidden.device)
    if tuple(mask.shape) != tuple(lead):
        raise ValueError(f"mask must have shape {tuple(lead)}, got {tuple(mask.shape)}")
    temperature = _checks.check_temperature(temperature)
    impl = _checks.resolve_impl(impl, hidden.device)
    if not ref_requires_grad:
        ref_hidden, ref_weight = ref_hidden.detach(), ref_weight.detach()
        ref_bias = None if ref_bias is None else ref_bias.detach()
    if impl == "reference":
        out = ref.linear_f_divergence(hidden, weight, ref_hidden, ref_weight, kind, alpha, bias, ref_bias,
                                      temperature, mask.bool())
        return out if hidden.dtype == torch.float64 else out.float()
    h = hidden.reshape(N, D).contiguous()
    rh = ref_hidden.reshape(N, Dr).contiguous()
    div = LinearFDivergenceFunction.apply(h, weight.contiguous(), bias, rh, ref_weight.contiguous(), ref_bias,
                                          mask.reshape(N).bool(), 1.0 / temperature, kind, alpha, impl)
    if hidden.dtype != torch.float64:
        div = div.float()
    return div.reshape(lead)
