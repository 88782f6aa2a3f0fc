"""bench/verify.py: where a provider and its oracle disagree, a float64 route arbitrates by the tests'
accuracy rule (a route at most twice the oracle's error against float64, plus the tolerance), so that
two low-precision routes of an ill-conditioned sum are not a mismatch, and a wrong one still is."""
from __future__ import annotations

import pytest
import torch

from bench import suite, verify

BF16 = torch.bfloat16


class _Scaled(torch.autograd.Function):
    """``y = x * d`` (``d`` one number) whose gradient of ``d`` is off by ``error`` times the sum of the
    absolute values of its terms: a route with that much rounding in an ill-conditioned sum."""

    @staticmethod
    def forward(ctx, x, d, error):
        ctx.save_for_backward(x, d)
        ctx.error = error
        return x * d

    @staticmethod
    def backward(ctx, grad_y):
        x, d = ctx.saved_tensors
        terms = grad_y.double() * x.double()
        grad_d = terms.sum() + ctx.error * terms.abs().sum()
        return grad_y * d, grad_d.to(d.dtype).reshape(d.shape), None


def _prepared(provider_error: float, oracle_error: float, with_float64: bool = True) -> tuple:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=g).to(BF16).requires_grad_()
    grad_out = torch.randn(4096, generator=g).to(BF16)
    # the gradient of d cancels to about 1e-4 of the size of its terms
    terms = grad_out.double() * x.detach().double()
    grad_out[0] -= (terms.sum() / x.detach()[0].double()).to(BF16) * 0.999
    d = torch.ones(1, dtype=BF16, requires_grad=True)

    def float64(x_, grad_out_):
        d64 = d.detach().double().requires_grad_()
        x64 = x_.detach().double().requires_grad_()
        y = x64 * d64
        y.backward(grad_out_.double())
        return y.detach(), x64.grad, [d64.grad]

    prepared = suite.Prepared(lambda t: _Scaled.apply(t, d, provider_error), [d],
                              lambda t: _Scaled.apply(t, d, oracle_error), "oracle",
                              float64=float64 if with_float64 else None)
    return prepared, x, grad_out


def test_two_routes_as_far_from_float64_as_each_other_are_not_a_mismatch():
    prepared, x, grad_out = _prepared(3e-4, -2e-4)
    check = verify.check_provider("test", "provider", prepared, x, grad_out, BF16)
    assert check.grad_params > check.tolerance  # they disagree...
    assert check.status == "ok", check  # ...but neither is further from float64 than the rule allows
    assert check.float64_errors["provider"] <= 2 * check.float64_errors["oracle"] + check.tolerance
    assert "against float64" in check.note


def test_a_route_far_from_float64_beside_an_accurate_oracle_is_a_mismatch():
    """The planted fault: the provider's gradient is off, the oracle's is not."""
    prepared, x, grad_out = _prepared(3e-4, 0.0)
    check = verify.check_provider("test", "provider", prepared, x, grad_out, BF16)
    assert check.status == "MISMATCH", check
    assert check.float64_errors["provider"] > 2 * check.float64_errors["oracle"] + check.tolerance


def test_without_a_float64_route_a_disagreement_is_a_mismatch():
    prepared, x, grad_out = _prepared(3e-4, -2e-4, with_float64=False)
    check = verify.check_provider("test", "provider", prepared, x, grad_out, BF16)
    assert check.status == "MISMATCH" and check.float64_errors is None


def test_float64_route_of_an_adapter_layer_is_its_float64_copy():
    shape = suite.conv("test/dw7x7_12_9", 12, 12, 9, 2, kernel=7, groups=12, bias=True)
    ctx = suite.Context(torch.device("cpu"), torch.float32)
    layer = suite.adapter_layer(shape, ctx, "ssb", "bypass")
    x, grad_out = suite.make_inputs(shape, ctx)
    y, grad_x, grads = suite.float64_route(layer)(x, grad_out)
    assert y.dtype == grad_x.dtype == torch.float64 and layer.weight.dtype == torch.float32
    assert [g.shape for g in grads] == [p.shape for p in layer.adapter_parameters()]
    x64 = x.detach().double().requires_grad_()
    import lrtensor_kernels as lk

    with lk.use_backend("reference"):
        layer.double()(x64).backward(grad_out.double())
    assert torch.equal(grad_x, x64.grad)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, layer.adapter_parameters()))


@pytest.mark.slow
def test_ssl_on_the_depthwise_layer_that_mismatched_on_the_gpu():
    """convnext_t/dw7x7_96_56 (depthwise 7x7, 96 channels, 56x56, batch 64) in bfloat16, SSL by
    scaling the activations: the scale's gradient sums 19 million products with bfloat16-rounded
    activation gradients and cancels. The native route (the exact sum of those products, as the
    Triton kernel's float32 one) and the reference (autograd in bfloat16) differ by 16%, each
    within 11% of float64: ok by the rule, and a mismatch by the direct comparison alone."""
    from lrtensor_kernels.backend import native_available

    if not native_available():
        pytest.skip("the native backend is unavailable")
    shape = next(s for s in suite.SUITE if s.name == "convnext_t/dw7x7_96_56")
    ctx = suite.Context(torch.device("cpu"), BF16)
    prepared = suite.setup_native(shape, ctx, "ssl", "bypass")
    check = verify.check_provider(shape.name, "ssl_native", prepared, *suite.make_inputs(shape, ctx), BF16)
    assert check.grad_params > check.tolerance and check.float64_errors is not None, check
    assert check.status == "ok", check
