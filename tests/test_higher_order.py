"""torch.func transforms, forward-mode AD and gradients of gradients, on every backend, strategy and
method, against the float64 oracle.

Under a torch.func transform, forward-mode AD or ``create_graph=True``, every backend differentiates
the same math in plain PyTorch ops (``ops.FusedOp``'s composite); these tests hold each combination
to the oracle (float64 layers: the same computation in float64 PyTorch differs from the oracle by
rounding alone, so the bound is a floor) and to gradcheck/gradgradcheck.
"""
from __future__ import annotations

import pytest
import torch
from torch.autograd import forward_ad
from torch.func import functional_call, grad, jacrev, jvp, vmap

import lrtensor_kernels as lk
from fused import fused_kernels
from oracle import F64, _weight64, plain_twin, randomize_adapter, rel_err
from lrtensor_kernels.strategies import cost

FLOOR = 1e-10  # float64 against the float64 oracle: rounding only

LAYERS = {
    "flora_conv2d_groups": lambda: lk.FLoRAConv2d(4, 6, 3, padding=1, groups=2, ranks=(3, 2, 2, 2)),
    # wide enough for bypass to keep u and z, where it runs the chain under plain autograd
    "flora_conv2d_wide": lambda: lk.FLoRAConv2d(16, 16, 3, padding=1, ranks=(2, 2, 2, 2)),
    "flora_linear": lambda: lk.FLoRALinear(5, 4, ranks=(3, 2)),
    "lora_conv2d_groups": lambda: lk.LoRAConv2d(4, 6, 3, padding=1, groups=2, rank=2),
    "lora_linear": lambda: lk.LoRALinear(5, 4, rank=2),
    "liera_conv1d_reflect": lambda: lk.LieRAConv1d(3, 4, 3, padding=1, padding_mode="reflect", rank=2),
    "liera_tucker_first_order_linear": lambda: lk.LieRALinear(5, 4, rank=2, delta="tucker", mode="first_order"),
    "ssl_conv2d_stride": lambda: lk.SSLConv2d(3, 4, 3, stride=2),
    "ssb_linear": lambda: lk.SSBLinear(5, 4),
    "ssb_conv2d_groups": lambda: lk.SSBConv2d(4, 4, 2, groups=2, bias=False),
}
BACKENDS = ("reference", "native", "triton")


def _cases():
    for name, make in LAYERS.items():
        for strategy in ("auto",) + cost.applicable(make().adapter_math):
            for backend in BACKENDS:
                yield pytest.param(name, strategy, backend, id=f"{name}-{strategy}-{backend}")
        yield pytest.param(name, "fused", "triton", id=f"{name}-fused-triton")  # fused runs on triton alone


cases = pytest.mark.parametrize("name, strategy, backend", list(_cases()))


def _setup(name, strategy, backend, batch=2, seed=0):
    if backend != "reference":
        fused_kernels(backend)
    torch.manual_seed(seed)
    layer = randomize_adapter(LAYERS[name]().double(), seed + 1)
    layer.strategy = strategy
    g = torch.Generator().manual_seed(seed + 2)
    shape = (batch, layer.in_features) if isinstance(layer, torch.nn.Linear) else (batch, layer.in_channels) + (
        5,) * (layer.weight.dim() - 2)
    x = torch.randn(shape, generator=g, dtype=F64)
    params = {n: p.detach().clone() for n, p in layer.adapter_state().items()}
    return layer, x, params


def _functions(layer):
    """``(f, f64)``: the layer and the oracle as functions of ``(adapter tensors by name, x)``."""
    twin = plain_twin(layer, layer.weight.detach().to(F64))

    def f(params, x):
        return functional_call(layer, params, (x,))

    def f64(params, x):
        return functional_call(twin, {"weight": _weight64(layer, params)}, (x,))

    return f, f64


def _assert_close(what, got, ref):
    if isinstance(ref, dict):
        for k in ref:
            _assert_close(f"{what}[{k}]", got[k], ref[k])
        return
    if isinstance(ref, (tuple, list)):
        for i, (a, b) in enumerate(zip(got, ref)):
            _assert_close(f"{what}[{i}]", a, b)
        return
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
    err = rel_err(got, ref, what)
    assert err <= FLOOR, f"{what}: error {err:.3e} against the float64 oracle"


def _random_like(tree, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g, dtype=F64) for k, v in tree.items()}


@cases
def test_torch_func_transforms_match_the_oracle(name, strategy, backend):
    """grad, vmap(grad) (per-sample gradients), jacrev, jvp and a forward-over-reverse
    Hessian-vector product, each against the same transform of the oracle."""
    layer, x, params = _setup(name, strategy, backend)
    f, f64 = _functions(layer)
    weights = torch.randn(f64(params, x).shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    tangents, x_tangent = _random_like(params, 7), torch.randn(x.shape, generator=torch.Generator().manual_seed(8),
                                                               dtype=F64)

    def transforms(fn):
        def loss(p, inp):
            return (fn(p, inp) * weights[: inp.shape[0]]).sum()

        return dict(
            grad=grad(loss, argnums=(0, 1))(params, x),
            per_sample=vmap(grad(lambda p, sample: loss(p, sample.unsqueeze(0))), in_dims=(None, 0))(params, x),
            jacrev=jacrev(fn, argnums=(0, 1))(params, x),
            jvp=jvp(fn, (params, x), (tangents, x_tangent)),
            hvp=jvp(lambda p: grad(loss)(p, x), (params,), (tangents,)),
        )

    with lk.use_backend(backend):
        got = transforms(f)
    ref = transforms(f64)
    for key in ref:
        _assert_close(f"{name} {strategy} {backend} {key}", got[key], ref[key])


@cases
def test_forward_mode_ad_with_dual_tensors(name, strategy, backend):
    """torch.autograd.forward_ad on the module itself (no torch.func): the output's tangent is the
    oracle's directional derivative along the tangents of x and every adapter tensor."""
    layer, x, params = _setup(name, strategy, backend)
    f, f64 = _functions(layer)
    tangents, x_tangent = _random_like(params, 3), torch.randn(x.shape, generator=torch.Generator().manual_seed(4),
                                                               dtype=F64)
    _, ref = jvp(f64, (params, x), (tangents, x_tangent))
    with lk.use_backend(backend), forward_ad.dual_level():
        duals = {n: forward_ad.make_dual(p, tangents[n]) for n, p in params.items()}
        y = functional_call(layer, duals, (forward_ad.make_dual(x, x_tangent),))
        tangent = forward_ad.unpack_dual(y).tangent
    assert tangent is not None, "no tangent came out"
    _assert_close(f"{name} {strategy} {backend} forward AD", tangent, ref)


@cases
def test_gradients_of_gradients_match_the_oracle(name, strategy, backend):
    """A gradient penalty (the squared norm of the first gradients, taken with create_graph) and
    its gradients with respect to x and every adapter tensor, against the oracle's."""
    layer, x, params = _setup(name, strategy, backend)

    def penalty_grads(fn):
        leaves = {n: p.clone().requires_grad_() for n, p in params.items()}
        inp = x.clone().requires_grad_()
        out = fn(leaves, inp)
        first = torch.autograd.grad(out.square().sum(), [inp, *leaves.values()], create_graph=True)
        penalty = sum(g.square().sum() for g in first)
        return [penalty.detach(), *torch.autograd.grad(penalty, [inp, *leaves.values()])]

    f, f64 = _functions(layer)
    with lk.use_backend(backend):
        got = penalty_grads(f)
    _assert_close(f"{name} {strategy} {backend} gradient penalty", got, penalty_grads(f64))


@cases
def test_gradcheck_and_gradgradcheck(name, strategy, backend):
    """First order (the fused backward) and second order (create_graph) against finite differences,
    with respect to x, the adapter tensors and a base weight made trainable."""
    layer, x, params = _setup(name, strategy, backend, batch=1)
    layer.weight.requires_grad_(True)
    names = list(params)

    def fn(inp, weight, *tensors):
        return functional_call(layer, {"weight": weight, **dict(zip(names, tensors))}, (inp,))

    inputs = (x.requires_grad_(), layer.weight.detach().clone().requires_grad_(),
              *(p.requires_grad_() for p in params.values()))
    with lk.use_backend(backend):
        assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)
        assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)


def test_a_dropped_second_order_term_is_caught(monkeypatch):
    """The gradient-penalty test can fail: a backward whose adapter gradients are detached (their
    second-order terms dropped, as the fused backward drops them) is far off the oracle."""
    from lrtensor_kernels import ops

    layer, x, params = _setup("flora_conv2d_groups", "bypass", "reference")
    f, f64 = _functions(layer)

    def penalty_grad(fn):
        leaves = {n: p.clone().requires_grad_() for n, p in params.items()}
        inp = x.clone().requires_grad_()
        first = torch.autograd.grad(fn(leaves, inp).square().sum(), [inp, *leaves.values()], create_graph=True)
        return torch.autograd.grad(sum(g.square().sum() for g in first), list(leaves.values()), allow_unused=True)

    ref = penalty_grad(f64)
    _assert_close("exact", penalty_grad(f), ref)
    original = ops._differentiable_backward

    def adapter_terms_dropped(ctx, composite, at, grads):
        found = original(ctx, composite, at, grads)
        return [g if i == 0 or g is None else g.detach() for i, g in enumerate(found)]  # 0: x

    monkeypatch.setattr(ops, "_differentiable_backward", adapter_terms_dropped)
    got = penalty_grad(f)
    assert max(rel_err(g, r) for g, r in zip(got, ref)) > 0.01
