"""Which gradient each KL form gives (experiments.md §1), exactly, on a 5-way softmax: the expectation over samples
is a weighted sum over the 5 outcomes, so no Monte Carlo noise. This is why the presets are named kl-k3 (the
paper's "RKL" row: a forward-KL gradient) and rkl-k2 / dph-rkl (reverse-KL gradients)."""
import torch

import dph_kernels as dk
from dph_kernels import reference as ref


def _setup():
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    log_ref = torch.log_softmax(torch.randn(5, generator=g, dtype=torch.float64), -1)
    return theta, log_ref


def _grad(f):
    theta, log_ref = _setup()
    f(torch.log_softmax(theta, -1), log_ref).backward()
    return theta.grad


def _on_policy(estimator):
    """E_{y ~ pi_theta}[grad of the per-token penalty at y], sampling not differentiated: sum_y pi(y) grad k(y)."""
    def f(logp, log_ref):
        return (logp.exp().detach() * dk.kl_penalty(logp, log_ref, estimator)).sum()
    return _grad(f)


def _stored(kind):
    """E_{y ~ pi_ref}[grad f(u(y))]: the divergence generator on stored pi_ref samples."""
    def f(logp, log_ref):
        return (log_ref.exp() * ref.f_generator(logp - log_ref, kind)).sum()
    return _grad(f)


def _forward_kl(logp, log_ref):
    return (log_ref.exp() * (log_ref - logp)).sum()


def _reverse_kl(logp, log_ref):
    return (logp.exp() * (logp - log_ref)).sum()


def test_k3_penalty_is_a_forward_kl_gradient():
    fwd, rev = _grad(_forward_kl), _grad(_reverse_kl)
    k3 = _on_policy("k3")
    assert torch.allclose(k3, fwd, atol=1e-12)
    assert not torch.allclose(k3, rev, atol=1e-3)  # the point of the renaming


def test_k2_penalty_and_rkl_generator_are_reverse_kl_gradients():
    rev = _grad(_reverse_kl)
    assert torch.allclose(_on_policy("k2"), rev, atol=1e-12)
    assert torch.allclose(_stored("rkl"), rev, atol=1e-12)
    assert torch.allclose(_stored("fkl"), _grad(_forward_kl), atol=1e-12)
    assert torch.allclose(_on_policy("k1"), torch.zeros(5, dtype=torch.float64), atol=1e-12)


def test_curvature_matches_second_derivative():
    """kappa = eta * f''(1): check CURVATURE against a finite difference of f(e^r) in u at u = 1."""
    for kind, c in dk.CURVATURE.items():
        if c is None or kind in ("k2", "k3"):
            continue
        h = 1e-4
        u = torch.tensor([1 - h, 1.0, 1 + h], dtype=torch.float64)
        f = ref.f_generator(torch.log(u), kind)
        assert abs(float((f[0] - 2 * f[1] + f[2]) / h ** 2) - c) < 1e-4, kind
