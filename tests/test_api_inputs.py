"""Every tensor argument of every public dph_kernels function gets a library error naming it.

The public functions are read from dk.__all__ (plus FusedLinearDPHLoss.forward); their parameters from
inspect.signature. A parameter that can take a tensor must appear in one of the valid calls below (a new tensor
parameter makes test_every_tensor_parameter_is_covered fail until it is added here). Each tensor argument is then
replaced by: a non-tensor, a tensor on another device ("meta"), a tensor of the wrong shape, and one of the wrong
dtype (masks: 0.5). Each must raise TypeError / ValueError from dph_kernels (not from torch) whose message names the
argument as a word.
"""
import inspect
import re

import pytest
import torch

import dph_kernels as dk

B, T, D, V, DR = 3, 4, 8, 11, 6

# Parameters of the public functions that never take a tensor.
NOT_TENSORS = {"normalizer", "dual_clip", "norm_length", "clamp", "group_size", "kind", "estimator", "mode",
               "softcap", "ref_softcap",  # floats or None (the logit softcap), never tensors
               "process_group", "vocab_size",  # a torch.distributed group and an int (tests/test_vocab_parallel.py)
               "chunk_cols"}  # an int (tests/test_linear_logprob.py)
# Arguments whose shape is free (no wrong shape exists) or whose dtype is free (any real dtype is read as float).
FREE_SHAPE = {("f_divergence", "log_ratio"), ("kl_penalty", "logp"), ("aggregate", "values"),
              ("grpo_advantages", "rewards")}
FREE_DTYPE = {("grpo_advantages", "rewards")}
MASKS = {"mask", "loss_mask"}


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g)
    return dict(
        hidden=hidden, weight=torch.randn(V, D, generator=g), bias=torch.randn(V, generator=g),
        targets=torch.randint(0, V, (B, T), generator=g), mask=torch.ones(B, T, dtype=torch.bool),
        logp=-torch.rand(B, T, generator=g), ref_logp=-torch.rand(B, T, generator=g),
        advantages=torch.randn(B, generator=g), rewards=torch.rand(4, generator=g),
        ref_hidden=torch.randn(B, T, DR, generator=g), ref_weight=torch.randn(V, DR, generator=g),
        ref_bias=torch.randn(V, generator=g))


def _calls():
    """(function name, callable, tensor kwargs, other kwargs): valid calls that together pass every tensor param."""
    x = _inputs()
    is_pef = torch.tensor([False, True, False])
    fused = dict(hidden=x["hidden"], weight=x["weight"], targets=x["targets"], loss_mask=x["mask"].float(),
                 is_pef=is_pef, advantages=x["advantages"], old_logp=x["logp"], ref_logp=x["ref_logp"],
                 bias=x["bias"])
    dph = dk.FusedLinearDPHLoss.preset("dph-js", impl="torch")
    rkl = dk.FusedLinearDPHLoss.preset("rkl", impl="torch")
    exact = dk.FusedLinearDPHLoss.preset("dph-js", impl="torch", divergence_mode="exact")
    return [
        ("linear_logprob", dk.linear_logprob,
         dict(hidden=x["hidden"], weight=x["weight"], targets=x["targets"], bias=x["bias"]), dict(impl="torch")),
        ("linear_f_divergence", dk.linear_f_divergence,
         dict(hidden=x["hidden"], weight=x["weight"], ref_hidden=x["ref_hidden"], ref_weight=x["ref_weight"],
              bias=x["bias"], ref_bias=x["ref_bias"], mask=x["mask"]), dict(kind="js", impl="torch")),
        ("FusedLinearDPHLoss.forward", dph, fused, {}),
        ("FusedLinearDPHLoss.forward", rkl,
         dict(fused, is_pef=torch.zeros(B, dtype=torch.bool), online_ref_logp=x["ref_logp"], ref_logp=None), {}),
        ("FusedLinearDPHLoss.forward", exact,
         dict(fused, ref_logp=None, ref_hidden=x["ref_hidden"], ref_weight=x["ref_weight"], ref_bias=x["ref_bias"]),
         {}),
        ("ppo_clip_loss", dk.ppo_clip_loss,
         dict(logp=x["logp"], old_logp=x["ref_logp"], advantages=x["advantages"], mask=x["mask"]), {}),
        ("f_divergence", dk.f_divergence, dict(log_ratio=x["logp"]), dict(kind="js")),
        ("kl_penalty", dk.kl_penalty, dict(logp=x["logp"], ref_logp=x["ref_logp"]), {}),
        ("aggregate", dk.aggregate, dict(values=x["logp"], mask=x["mask"]), {}),
        ("grpo_advantages", dk.grpo_advantages, dict(rewards=x["rewards"]), dict(group_size=2)),
    ]


def _public_signatures():
    out = {}
    for name in dk.__all__:
        obj = getattr(dk, name)
        if inspect.isfunction(obj):
            out[name] = inspect.signature(obj)
    out["FusedLinearDPHLoss.forward"] = inspect.signature(dk.FusedLinearDPHLoss.forward)
    return out


def _tensor_params(sig):
    """Parameters that may take a tensor: required ones and those defaulting to None, minus NOT_TENSORS."""
    return {p.name for p in sig.parameters.values()
            if p.name != "self" and p.name not in NOT_TENSORS
            and (p.default is inspect.Parameter.empty or p.default is None)}


def test_every_tensor_parameter_is_covered():
    covered = {}
    for name, _, tensors, _ in _calls():
        covered.setdefault(name, set()).update(k for k, v in tensors.items() if v is not None)
    for name, sig in _public_signatures().items():
        missing = _tensor_params(sig) - covered.get(name, set())
        assert not missing, f"{name}: tensor parameter(s) {sorted(missing)} are not exercised by this test"


@pytest.mark.parametrize("i", range(len(_calls())), ids=lambda i: _calls()[i][0])
def test_the_valid_calls_run(i):
    name, fn, tensors, other = _calls()[i]
    fn(**{k: v for k, v in tensors.items() if v is not None}, **other)


def _bad_values(fname, arg, x, n_tensors=2):
    yield "not a tensor", x.tolist()
    if n_tensors > 1:  # a lone tensor argument may live on any device
        yield "another device", x.to("meta")
    if (fname, arg) not in FREE_SHAPE:
        yield "wrong shape", x[..., :-1]
    if (fname, arg) in FREE_DTYPE:
        return
    if arg in MASKS:
        yield "mask value 0.5", torch.full(x.shape, 0.5)
    elif x.dtype == torch.bool:
        yield "wrong dtype", x.float()
    elif x.dtype.is_floating_point:
        yield "wrong dtype", torch.zeros(x.shape, dtype=torch.long)
    else:
        yield "wrong dtype", x.float()


def _cases():
    out = []
    for i, (name, _, tensors, _) in enumerate(_calls()):
        for arg, x in tensors.items():
            if x is None:
                continue
            for what, _ in _bad_values(name, arg, x, len(tensors)):
                out.append(pytest.param(i, arg, what, id=f"{name}-{i}-{arg}-{what.replace(' ', '_')}"))
    return out


@pytest.mark.parametrize("i, arg, what", _cases())
def test_a_bad_tensor_argument_gets_an_error_naming_it(i, arg, what):
    name, fn, tensors, other = _calls()[i]
    bad = dict(_bad_values(name, arg, tensors[arg], len(tensors)))[what]
    kw = {k: v for k, v in tensors.items() if v is not None}
    kw[arg] = bad
    with pytest.raises((TypeError, ValueError)) as e:
        fn(**kw, **other)
    assert re.search(rf"(?<![\w.]){re.escape(arg)}(?!\w)", str(e.value)), f"{name}({arg}: {what}): {e.value}"
    raised_in = str(e.traceback[-1].path)
    assert "dph_kernels" in raised_in, f"{name}({arg}: {what}) raised from {raised_in}: {e.value!r}"


def test_fused_loss_rejects_a_half_mask_like_ppo_clip_loss():
    x = _inputs()
    half = torch.full((B, T), 0.5)
    with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
        dk.ppo_clip_loss(x["logp"], x["ref_logp"], x["advantages"], half)
    with pytest.raises(ValueError, match="loss_mask must hold only 0 and 1"):
        dk.FusedLinearDPHLoss.preset("grpo", impl="torch")(x["hidden"], x["weight"], x["targets"], half,
                                                           torch.zeros(B, dtype=torch.bool), advantages=x["advantages"])


@pytest.mark.parametrize("arg", ["old_logp", "ref_logp", "advantages"])
def test_fused_loss_device_mismatch_names_the_argument(arg):
    _, fn, tensors, _ = _calls()[2]
    kw = dict(tensors, **{arg: tensors[arg].to("meta")})
    with pytest.raises(ValueError, match=rf"^{arg} is on meta but hidden is on cpu"):
        fn(**kw)


def test_sampled_loss_refuses_a_reference_head():
    _, fn, tensors, _ = _calls()[2]
    x = _inputs()
    with pytest.raises(ValueError, match="ref_hidden is only used with divergence_mode='exact'"):
        fn(**tensors, ref_hidden=x["ref_hidden"], ref_weight=x["ref_weight"])


@pytest.mark.parametrize("fn", [dk.linear_logprob, dk.linear_f_divergence, dk.FusedLinearDPHLoss.forward,
                                dk.ppo_clip_loss, dk.f_divergence, dk.kl_penalty, dk.aggregate, dk.grpo_advantages],
                         ids=lambda f: f.__qualname__)
def test_public_calls_document_their_tensors(fn):
    doc = inspect.getdoc(fn) or ""
    assert "Define the computation performed at every call" not in doc
    params = _tensor_params(inspect.signature(fn)) | ({"kind"} if "kind" in inspect.signature(fn).parameters else set())
    missing = [p for p in params if not re.search(rf"(?<!\w){p}(?!\w)", doc)]
    assert not missing, f"{fn.__qualname__}'s docstring does not describe {missing}"
    assert re.search(r"Returns?\b", doc), f"{fn.__qualname__}'s docstring does not say what it returns"


def test_help_of_the_fused_forward_says_what_targets_are():
    doc = " ".join(inspect.getdoc(dk.FusedLinearDPHLoss.forward).split())
    assert "shifted by one" in doc and "(B, T, D)" in doc and "loss_mask: (B, T) bool" in doc
