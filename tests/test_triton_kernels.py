"""The Triton transform and projection kernels against the float64 oracle.

On a machine without CUDA these run under TRITON_INTERPRET=1 (set in conftest) in float32 and
float16; bfloat16 and the full opcheck run on a GPU only.
"""
from __future__ import annotations

import math
import zlib

import pytest
import torch

from lrtensor_kernels import methods
from oracle import F64, assert_accuracy, rel_err, tucker64

triton = pytest.importorskip("triton")
from lrtensor_kernels.kernels import triton_transform as tt  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
FLOOR = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}

# weight shapes of order 2..5 with sizes that cross the kernels' block edges
SHAPES = {
    "linear": (37, 70),
    "conv1d": (9, 5, 4),
    "conv2d": (40, 8, 3, 3),
    "depthwise": (12, 1, 5, 5),
    "conv3d": (10, 3, 2, 3, 2),
}
MATHS = ["tucker:add", "tucker:exp", "tucker:first_order", "lora:exp", "lora:first_order", "lora:add",
         "scales:mul", "scales_out:mul"]


def make_adapter(key: str, shape, seed: int, dtype=torch.float32):
    """Random adapter tensors for ``shape`` (never zero: a zero core hides every bug)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    delta = key.split(":")[0]
    if delta == "tucker":
        ranks = [min(d, r) for d, r in zip(shape, (6, 5, 2, 2, 2))]
        tensors = [0.5 * rnd(*ranks)] + [rnd(d, r) / math.sqrt(r) for d, r in zip(shape, ranks)]
    elif delta == "lora":
        r = 3
        tensors = [rnd(shape[0], r) * 0.3, rnd(r, math.prod(shape[1:])) * 0.3]
    else:
        tensors = [1 + 0.3 * rnd(shape[1])] + ([1 + 0.3 * rnd(shape[0])] if delta == "scales_out" else [])
    return [t.to(dtype).to(DEVICE) for t in tensors]


def math_key(key: str) -> str:
    return key.replace("scales_out", "scales")


def oracle_weight(key, weight, adapter, scale, delta_only=False):
    """W' (or W' - W) in float64 from the formulas."""
    delta, combine = math_key(key).split(":")
    w = weight.to(F64)
    a = [t.to(F64) for t in adapter]
    if delta == "tucker":
        d = tucker64(a[0], a[1:])
    elif delta == "lora":
        d = (a[0] @ a[1]).reshape(w.shape)
    else:
        d = a[0].reshape((1, -1) + (1,) * (w.dim() - 2))
        if len(a) == 2:
            d = d * a[1].reshape((-1,) + (1,) * (w.dim() - 1))
    e = scale * d
    new = {"add": w + e, "exp": w * torch.exp(e), "first_order": w * (1 + e), "mul": w * e}[combine]
    return new - w if delta_only else new


@pytest.fixture
def poisoned_buffers(monkeypatch):
    """Every buffer a kernel writes starts as NaN, so an unwritten element fails the test."""

    def nan_buffer(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(tt, "_new_buffer", nan_buffer)


def _base_weight(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=F64) * 0.5).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("key", MATHS)
@pytest.mark.parametrize("delta_only", [False, True], ids=["full", "delta_only"])
def test_transform_matches_oracle(key, shape_name, dtype, delta_only, poisoned_buffers):
    shape = SHAPES[shape_name]
    seed = zlib.crc32(f"{key}-{shape_name}-{dtype}-{delta_only}".encode())
    weight = _base_weight(shape, dtype, seed)
    adapter = make_adapter(key, shape, seed + 1)
    scale = 1.0 if key.endswith("mul") else 0.7
    got = tt.transform(weight, adapter, math_key(key), scale, delta_only)
    assert got.dtype == dtype and got.shape == weight.shape
    plain = methods.effective_weight(weight, adapter, methods.AdapterMath.from_key(math_key(key)), scale, delta_only)
    ref = oracle_weight(key, weight, adapter, scale, delta_only)
    assert_accuracy(f"W' {key} {shape_name} {dtype} seed {seed}", got, plain, ref, FLOOR[dtype])


def test_transform_writes_into_given_buffer():
    weight = _base_weight(SHAPES["conv2d"], torch.float32, 0)
    adapter = make_adapter("tucker:add", weight.shape, 1)
    out = torch.full_like(weight, float("nan"))
    got = tt.transform(weight, adapter, "tucker:add", 0.5, out=out)
    assert got is out and torch.isfinite(out).all()


def _oracle_grads(key, weight, adapter, scale, grad):
    leaves = [t.detach().to(F64).requires_grad_() for t in adapter]
    w_new = oracle_weight(key, weight, leaves, scale)
    return torch.autograd.grad((w_new * grad.to(F64)).sum(), leaves)


def _plain_grads(key, weight, adapter, scale, grad):
    """Plain PyTorch autograd of the reference math in the same dtype."""
    leaves = [t.detach().clone().requires_grad_() for t in adapter]
    w_new = methods.effective_weight(weight, leaves, methods.AdapterMath.from_key(math_key(key)), scale)
    return torch.autograd.grad((w_new * grad).sum(), leaves)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("key", MATHS)
def test_project_matches_oracle(key, shape_name, dtype, poisoned_buffers):
    shape = SHAPES[shape_name]
    seed = zlib.crc32(f"{key}-{shape_name}-{dtype}-grad".encode())
    weight = _base_weight(shape, dtype, seed)
    adapter = make_adapter(key, shape, seed + 1)
    grad = _base_weight(shape, dtype, seed + 2)
    scale = 1.0 if key.endswith("mul") else 0.7
    got = tt.project(grad, weight, adapter, math_key(key), scale)
    ref = _oracle_grads(key, weight, adapter, scale, grad)
    plain = _plain_grads(key, weight, adapter, scale, grad)
    magnitude = _oracle_grads(key, weight.abs(), [t.abs() for t in adapter], scale, grad.abs())
    assert len(got) == len(adapter)
    for i, (g, p, r, m, t) in enumerate(zip(got, plain, ref, magnitude, adapter)):
        assert g.shape == t.shape and g.dtype == t.dtype
        assert_accuracy(f"grad[{i}] {key} {shape_name} {dtype} seed {seed}", g, p, r, FLOOR[dtype], m)


@pytest.mark.parametrize("key", ["tucker:add", "lora:exp", "scales_out:mul"])
def test_project_is_bitwise_deterministic(key):
    shape = (70, 33, 3, 3) if DEVICE == "cuda" else SHAPES["conv2d"]
    weight = _base_weight(shape, torch.float32, 3)
    adapter = make_adapter(key, shape, 4)
    grad = _base_weight(shape, torch.float32, 5)
    first = tt.project(grad, weight, adapter, math_key(key), 0.5)
    for _ in range(2):
        again = tt.project(grad, weight, adapter, math_key(key), 0.5)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_float64_weights_compute_in_float64():
    weight = _base_weight(SHAPES["conv2d"], F64, 6)
    adapter = make_adapter("tucker:exp", weight.shape, 7, F64)
    got = tt.transform(weight, adapter, "tucker:exp", 0.3)
    assert rel_err(got, oracle_weight("tucker:exp", weight, adapter, 0.3)) < 1e-13
    grads = tt.project(weight, weight, adapter, "tucker:exp", 0.3)
    for g, r in zip(grads, _oracle_grads("tucker:exp", weight, adapter, 0.3, weight)):
        assert rel_err(g, r) < 1e-12


def test_adapter_on_other_device_is_rejected():
    if DEVICE != "cuda":
        pytest.skip("needs two devices")
    weight = _base_weight(SHAPES["linear"], torch.float32, 0)
    adapter = [t.cpu() for t in make_adapter("lora:exp", weight.shape, 1)]
    with pytest.raises(ValueError, match="adapter tensor on cpu"):
        tt.transform(weight, adapter, "lora:exp", 1.0)
