"""The fused backends' kernels (transform, projection, channel_dot) against the float64 oracle.

Every test runs on each fused backend: "triton" (on a machine without CUDA under
TRITON_INTERPRET=1, set in conftest, with tf32 dots and bfloat16 casts rounded as on a GPU; the
full opcheck on a GPU only) and "native" (the C++ kernels on the CPU in every dtype, the CUDA kernels on a GPU).
"""
from __future__ import annotations

import math
import zlib

import pytest
import torch

from fused import FUSED_BACKENDS, fused_kernels
from lrtensor_kernels import methods
from oracle import F64, assert_accuracy, rel_err, tucker64

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# under the interpreter, tf32 dots and bfloat16 casts round as on a GPU (conftest, gpu_rounding.py)
DTYPES = {"triton": [torch.float32, torch.float16, torch.bfloat16],
          "native": [torch.float32, torch.float16, torch.bfloat16]}
FLOOR = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}

# weight shapes of order 2..5 with sizes that cross the kernels' block edges
SHAPES = {
    "linear": (37, 70),
    "conv1d": (9, 5, 4),
    "conv2d": (40, 8, 3, 3),
    "depthwise": (12, 1, 5, 5),
    "conv3d": (10, 3, 2, 3, 2),
}
# sizes that cross the native CPU kernels' tile edges (256-row strips, column segments of equal width, column
# chunks, 16-row blocks, 4-row tiles, vector tails); native only (too slow for the Triton interpreter)
LARGE_SHAPES = {
    "large_linear": (299, 1100),
    "large_conv2d": (261, 7, 13, 13),
    "large_conv3d": (258, 5, 3, 3, 25),
}
ALL_SHAPES = {**SHAPES, **LARGE_SHAPES}
MATHS = ["tucker:add", "tucker:exp", "tucker:first_order", "lora:exp", "lora:first_order", "lora:add",
         "scales:mul", "scales_out:mul"]


def cases():
    """(backend, dtype, shape name) for parametrize; the large shapes on native only."""
    return [pytest.param(b, d, n, id=f"{b}-{str(d).replace('torch.', '')}-{n}") for b in FUSED_BACKENDS
            for d in DTYPES[b] for n in (ALL_SHAPES if b == "native" else SHAPES)]


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
    if delta_only:  # without the cancellation of (W + E) - W
        return {"add": e, "exp": w * torch.expm1(e), "first_order": w * e, "mul": w * (e - 1)}[combine]
    return {"add": w + e, "exp": w * torch.exp(e), "first_order": w * (1 + e), "mul": w * e}[combine]


@pytest.fixture
def poisoned(monkeypatch):
    """``poisoned(backend)``: that backend's kernel module, with every buffer it writes starting as
    NaN, so an unwritten element fails the test."""

    def nan_buffer(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    def kernels(backend):
        module = fused_kernels(backend)
        monkeypatch.setattr(module, "_new_buffer", nan_buffer)
        return module

    return kernels


def _base_weight(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=F64) * 0.5).to(dtype).to(DEVICE)


@pytest.mark.parametrize("backend,dtype,shape_name", cases())
@pytest.mark.parametrize("key", MATHS)
@pytest.mark.parametrize("delta_only", [False, True], ids=["full", "delta_only"])
def test_transform_matches_oracle(backend, key, shape_name, dtype, delta_only, poisoned):
    kernels = poisoned(backend)
    shape = ALL_SHAPES[shape_name]
    seed = zlib.crc32(f"{key}-{shape_name}-{dtype}-{delta_only}".encode())
    weight = _base_weight(shape, dtype, seed)
    adapter = make_adapter(key, shape, seed + 1)
    scale = 1.0 if key.endswith("mul") else 0.7
    got = kernels.transform(weight, adapter, math_key(key), scale, delta_only)
    assert got.dtype == dtype and got.shape == weight.shape
    plain = methods.effective_weight(weight, adapter, methods.AdapterMath.from_key(math_key(key)), scale, delta_only)
    ref = oracle_weight(key, weight, adapter, scale, delta_only)
    assert_accuracy(f"W' {key} {shape_name} {dtype} seed {seed}", got, plain, ref, FLOOR[dtype])


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_transform_writes_into_given_buffer(backend):
    kernels = fused_kernels(backend)
    weight = _base_weight(SHAPES["conv2d"], torch.float32, 0)
    adapter = make_adapter("tucker:add", weight.shape, 1)
    out = torch.full_like(weight, float("nan"))
    got = kernels.transform(weight, adapter, "tucker:add", 0.5, out=out)
    assert got is out and torch.isfinite(out).all()


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_native_transform_stores_in_the_buffer_dtype(out_dtype, poisoned):
    """Under autocast W' is written in the autocast dtype from a float32 weight."""
    kernels = poisoned("native")
    weight = _base_weight(LARGE_SHAPES["large_conv2d"], torch.float32, 2)
    adapter = make_adapter("lora:exp", weight.shape, 3)
    out = torch.full(weight.shape, float("nan"), dtype=out_dtype, device=DEVICE)
    kernels.transform(weight, adapter, "lora:exp", 0.7, out=out)
    ref = oracle_weight("lora:exp", weight, adapter, 0.7)
    plain = methods.effective_weight(weight, adapter, methods.AdapterMath.from_key("lora:exp"), 0.7).to(out_dtype)
    assert_accuracy(f"W' stored in {out_dtype}", out, plain, ref, FLOOR[out_dtype] if out_dtype != F64 else 1e-6)


def _oracle_grads(key, weight, adapter, scale, grad):
    leaves = [t.detach().to(F64).requires_grad_() for t in adapter]
    w_new = oracle_weight(key, weight, leaves, scale)
    return torch.autograd.grad((w_new * grad.to(F64)).sum(), leaves)


def _plain_grads(key, weight, adapter, scale, grad):
    """Plain PyTorch autograd of the reference math in the same dtype."""
    leaves = [t.detach().clone().requires_grad_() for t in adapter]
    w_new = methods.effective_weight(weight, leaves, methods.AdapterMath.from_key(math_key(key)), scale)
    return torch.autograd.grad((w_new * grad).sum(), leaves)


@pytest.mark.parametrize("backend,dtype,shape_name", cases())
@pytest.mark.parametrize("key", MATHS)
def test_project_matches_oracle(backend, key, shape_name, dtype, poisoned):
    kernels = poisoned(backend)
    shape = ALL_SHAPES[shape_name]
    seed = zlib.crc32(f"{key}-{shape_name}-{dtype}-grad".encode())
    weight = _base_weight(shape, dtype, seed)
    adapter = make_adapter(key, shape, seed + 1)
    grad = _base_weight(shape, dtype, seed + 2)
    scale = 1.0 if key.endswith("mul") else 0.7
    got = kernels.project(grad, weight, adapter, math_key(key), scale)
    ref = _oracle_grads(key, weight, adapter, scale, grad)
    plain = _plain_grads(key, weight, adapter, scale, grad)
    magnitude = _oracle_grads(key, weight.abs(), [t.abs() for t in adapter], scale, grad.abs())
    assert len(got) == len(adapter)
    for i, (g, p, r, m, t) in enumerate(zip(got, plain, ref, magnitude, adapter)):
        assert g.shape == t.shape and g.dtype == t.dtype
        assert_accuracy(f"grad[{i}] {key} {shape_name} {dtype} seed {seed}", g, p, r, FLOOR[dtype], m)


def test_native_project_takes_a_gradient_of_another_dtype(poisoned):
    """Under autocast dLoss/dW' comes in the autocast dtype beside a float32 weight."""
    kernels = poisoned("native")
    shape = LARGE_SHAPES["large_linear"]
    weight = _base_weight(shape, torch.float32, 4)
    adapter = make_adapter("tucker:exp", shape, 5)
    grad = _base_weight(shape, torch.bfloat16, 6)
    got = kernels.project(grad, weight, adapter, "tucker:exp", 0.7)
    ref = _oracle_grads("tucker:exp", weight, adapter, 0.7, grad)
    plain = _plain_grads("tucker:exp", weight, adapter, 0.7, grad.float())
    for i, (g, p, r) in enumerate(zip(got, plain, ref)):
        assert_accuracy(f"grad[{i}] from a bfloat16 gradient", g, p, r, FLOOR[torch.float32])


@pytest.mark.parametrize("dtype,shape_name", [pytest.param(d, n, id=f"{str(d)[6:]}-{n}") for d in DTYPES["native"]
                                                for n in ALL_SHAPES])
@pytest.mark.parametrize("key", MATHS)
@pytest.mark.parametrize("delta_only", [False, True], ids=["full", "delta_only"])
def test_native_project_transform_is_both_ops_bit_for_bit(key, shape_name, dtype, delta_only, poisoned):
    """The one-pass backward of a merged layer (CPU): the same W' and gradients as transform and
    project, every rule, dtype and shape; both checked against the float64 oracle too."""
    kernels = poisoned("native")
    if DEVICE != "cpu":
        pytest.skip("lowrank_project_transform has a CPU kernel only")
    shape = ALL_SHAPES[shape_name]
    seed = zlib.crc32(f"{key}-{shape_name}-{dtype}-{delta_only}-fused".encode())
    weight, grad = _base_weight(shape, dtype, seed), _base_weight(shape, dtype, seed + 2)
    adapter = make_adapter(key, shape, seed + 1)
    scale = 1.0 if key.endswith("mul") else 0.7
    w_new, grads = kernels.project_transform(grad, weight, adapter, math_key(key), scale, delta_only)
    assert torch.equal(w_new, kernels.transform(weight, adapter, math_key(key), scale, delta_only))
    for g, want in zip(grads, kernels.project(grad, weight, adapter, math_key(key), scale), strict=True):
        assert torch.equal(g, want)
    plain = methods.effective_weight(weight, adapter, methods.AdapterMath.from_key(math_key(key)), scale, delta_only)
    assert_accuracy(f"W' {key} {shape_name}", w_new, plain, oracle_weight(key, weight, adapter, scale, delta_only),
                    FLOOR[dtype])
    ref = _oracle_grads(key, weight, adapter, scale, grad)
    magnitude = _oracle_grads(key, weight.abs(), [t.abs() for t in adapter], scale, grad.abs())
    for i, (g, p, r, m) in enumerate(zip(grads, _plain_grads(key, weight, adapter, scale, grad), ref, magnitude)):
        assert_accuracy(f"grad[{i}] {key} {shape_name}", g, p, r, FLOOR[dtype], m)


def test_native_project_transform_stores_in_the_buffer_dtype(poisoned):
    kernels = poisoned("native")
    weight = _base_weight(LARGE_SHAPES["large_conv2d"], torch.float32, 12)
    adapter = make_adapter("lora:exp", weight.shape, 13)
    out = torch.full(weight.shape, float("nan"), dtype=torch.bfloat16, device=DEVICE)
    got, _ = kernels.project_transform(weight, weight, adapter, "lora:exp", 0.7, out=out)
    assert got is out
    assert torch.equal(out, kernels.transform(weight, adapter, "lora:exp", 0.7, out=torch.empty_like(out)))


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("key", ["tucker:add", "lora:exp", "scales_out:mul"])
def test_project_is_bitwise_deterministic(backend, key):
    kernels = fused_kernels(backend)
    shape = (70, 33, 3, 3) if DEVICE == "cuda" else SHAPES["conv2d"]
    weight = _base_weight(shape, torch.float32, 3)
    adapter = make_adapter(key, shape, 4)
    grad = _base_weight(shape, torch.float32, 5)
    first = kernels.project(grad, weight, adapter, math_key(key), 0.5)
    for _ in range(2):
        again = kernels.project(grad, weight, adapter, math_key(key), 0.5)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.fixture
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("key", ["tucker:add", "lora:exp", "scales_out:mul"])
def test_native_results_are_the_same_bits_at_any_thread_count(key):
    """The CPU kernels cut the work by the shape, never by the thread count."""
    kernels = fused_kernels("native")
    shape = (600, 40, 7, 7)  # 3 strips x 6 segments of the projection
    weight = _base_weight(shape, torch.float32, 7)
    adapter = make_adapter(key, shape, 8)
    grad = _base_weight(shape, torch.float32, 9)
    x, y = _base_weight((130, 24, 9, 9), torch.float32, 10), _base_weight((130, 24, 9, 9), torch.float32, 11)
    results = {}
    for threads in (1, 2, 3):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            assert torch.get_num_threads() == threads
            results[threads] = (kernels.project(grad, weight, adapter, math_key(key), 0.5),
                                kernels.transform(weight, adapter, math_key(key), 0.5),
                                [kernels.channel_dot(x, y, d) for d in range(4)],
                                kernels.project_transform(grad, weight, adapter, math_key(key), 0.5))
        finally:
            torch.set_num_threads(previous)
    (g1, w1, c1, f1) = results[1]
    for g2, w2, c2, f2 in (results[2], results[3]):
        assert torch.equal(f1[0], f2[0]) and all(torch.equal(a, b) for a, b in zip(f1[1], f2[1]))
        assert all(torch.equal(a, b) for a, b in zip(g1, g2))
        assert torch.equal(w1, w2)
        assert all(torch.equal(a, b) for a, b in zip(c1, c2))


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_float64_weights_compute_in_float64(backend):
    kernels = fused_kernels(backend)
    weight = _base_weight(SHAPES["conv2d"], F64, 6)
    adapter = make_adapter("tucker:exp", weight.shape, 7, F64)
    got = kernels.transform(weight, adapter, "tucker:exp", 0.3)
    assert rel_err(got, oracle_weight("tucker:exp", weight, adapter, 0.3)) < 1e-13
    grads = kernels.project(weight, weight, adapter, "tucker:exp", 0.3)
    for g, r in zip(grads, _oracle_grads("tucker:exp", weight, adapter, 0.3, weight)):
        assert rel_err(g, r) < 1e-12


@pytest.mark.parametrize("key", MATHS)
@pytest.mark.parametrize("shape_name", ["linear", "large_conv2d"])
def test_native_float64_in_every_rule(key, shape_name, poisoned):
    """float64 weights get float64 accuracy, W' - W included (expm1, not exp - 1, for exp)."""
    kernels = poisoned("native")
    shape = ALL_SHAPES[shape_name]
    weight = _base_weight(shape, F64, 12)
    # tiny updates: exp(E) - 1 would lose every digit below 1e-16 / |E|
    adapter = [t * 1e-4 if key.startswith(("tucker", "lora")) else t for t in make_adapter(key, shape, 13, F64)]
    scale = 1.0 if key.endswith("mul") else 0.7
    for delta_only in (False, True):
        got = kernels.transform(weight, adapter, math_key(key), scale, delta_only)
        assert rel_err(got, oracle_weight(key, weight, adapter, scale, delta_only)) < 1e-14, delta_only
    grad = _base_weight(shape, F64, 14)
    for g, r in zip(kernels.project(grad, weight, adapter, math_key(key), scale),
                    _oracle_grads(key, weight, adapter, scale, grad)):
        assert rel_err(g, r) < 1e-12


def test_native_delta_only_exp_is_accurate_for_tiny_updates_in_float32(poisoned):
    kernels = poisoned("native")
    weight = _base_weight(SHAPES["conv2d"], torch.float32, 15)
    adapter = [t * 1e-3 for t in make_adapter("lora:exp", weight.shape, 16)]
    got = kernels.transform(weight, adapter, "lora:exp", 1.0, delta_only=True)
    assert rel_err(got, oracle_weight("lora:exp", weight, adapter, 1.0, delta_only=True)) < 1e-6


def test_adapter_on_other_device_is_rejected():
    if DEVICE != "cuda":
        pytest.skip("needs two devices")
    for backend in FUSED_BACKENDS:
        kernels = fused_kernels(backend)
        weight = _base_weight(SHAPES["linear"], torch.float32, 0)
        adapter = [t.cpu() for t in make_adapter("lora:exp", weight.shape, 1)]
        with pytest.raises(ValueError, match="adapter tensor on cpu"):
            kernels.transform(weight, adapter, "lora:exp", 1.0)


# ---------------------------------------------------------------------------------------------
# channel_dot
# ---------------------------------------------------------------------------------------------
CHANNEL_CASES = {
    "nchw": ((5, 19, 11, 13), 1),
    "linear": ((300, 37), 1),
    "linear_last": ((300, 37), -1),
    "outer_only": ((70, 3, 4), 2),
    "first_dim": ((19, 6, 5), 0),
    "conv3d": ((2, 6, 3, 4, 5), 1),
    "one_dim": ((23,), 0),
    "many_blocks": ((150, 9, 40), 1),  # native: 3 blocks of 64 outer rows, several channel chunks
}
CHANNEL_DTYPES = {"triton": [torch.float32, torch.float16, torch.bfloat16],
                  "native": [torch.float32, torch.float16, torch.bfloat16]}


def channel_oracle(a, b, dim):
    """Sum of a * b in float64 over every dim but ``dim``."""
    prod = (a.to(F64) * b.to(F64)).movedim(dim, 0)
    return prod.reshape(prod.shape[0], -1).sum(1)


def channel_plain(a, b, dim):
    """Plain PyTorch in the inputs' dtype."""
    prod = (a * b).movedim(dim, 0)
    return prod.reshape(prod.shape[0], -1).sum(1)


@pytest.mark.parametrize("backend,dtype", [pytest.param(b, d, id=f"{b}-{str(d)[6:]}") for b in FUSED_BACKENDS
                                           for d in CHANNEL_DTYPES[b]])
@pytest.mark.parametrize("case", list(CHANNEL_CASES))
def test_channel_dot_matches_oracle(backend, dtype, case, poisoned):
    kernels = poisoned(backend)
    shape, dim = CHANNEL_CASES[case]
    a, b = _base_weight(shape, dtype, 20), _base_weight(shape, dtype, 21)
    got = kernels.channel_dot(a, b, dim)
    assert got.shape == (shape[dim],) and got.dtype == torch.float32
    ref = channel_oracle(a, b, dim)
    magnitude = channel_oracle(a.abs(), b.abs(), dim)
    assert_accuracy(f"channel_dot {case} {dtype}", got, channel_plain(a, b, dim), ref, FLOOR[dtype], magnitude)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_channel_dot_float64_and_channels_last(backend, poisoned):
    kernels = poisoned(backend)
    a, b = _base_weight((3, 8, 6, 5), F64, 22), _base_weight((3, 8, 6, 5), F64, 23)
    got = kernels.channel_dot(a, b, 1)
    assert got.dtype == F64 and rel_err(got, channel_oracle(a, b, 1)) < 1e-14
    a_cl, b_cl = a.to(memory_format=torch.channels_last), b.to(memory_format=torch.channels_last)
    assert rel_err(kernels.channel_dot(a_cl, b_cl, 1), channel_oracle(a, b, 1)) < 1e-14
    # a strided view is copied, not misread
    view = a.transpose(2, 3)
    assert rel_err(kernels.channel_dot(view, b.transpose(2, 3), 1), channel_oracle(a, b, 1)) < 1e-14


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_channel_dot_is_bitwise_deterministic(backend):
    kernels = fused_kernels(backend)
    a, b = _base_weight((150, 9, 40), torch.float32, 24), _base_weight((150, 9, 40), torch.float32, 25)
    first = kernels.channel_dot(a, b, 1)
    assert all(torch.equal(first, kernels.channel_dot(a, b, 1)) for _ in range(2))


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_channel_dot_rejects_mismatched_operands(backend):
    kernels = fused_kernels(backend)
    a = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match=r"channel_dot: a and b must have one shape"):
        kernels.channel_dot(a, torch.zeros(2, 3, 5), 1)
    with pytest.raises(ValueError, match=r"channel_dot: channel_dim 3 out of range for a of shape \(2, 3, 4\)"):
        kernels.channel_dot(a, a, 3)


def test_native_sees_adapter_tensors_changed_in_place(poisoned):
    """The native backend reuses the low-rank form of unchanged adapter tensors within a step;
    an in-place update (an optimizer step) must be seen by the next call."""
    kernels = poisoned("native")
    weight = _base_weight(SHAPES["conv2d"], torch.float32, 30)
    for key in ("tucker:exp", "lora:first_order", "scales_out:mul"):
        adapter = make_adapter(key, weight.shape, 31)
        grad = _base_weight(SHAPES["conv2d"], torch.float32, 32)
        kernels.transform(weight, adapter, math_key(key), 0.5)
        kernels.project(grad, weight, adapter, math_key(key), 0.5)
        with torch.no_grad():
            adapter[-1].mul_(1.5)
        got = kernels.transform(weight, adapter, math_key(key), 0.5)
        assert rel_err(got, oracle_weight(key, weight, adapter, 0.5)) < 1e-6, key
        for g, r in zip(kernels.project(grad, weight, adapter, math_key(key), 0.5),
                        _oracle_grads(key, weight, adapter, 0.5, grad)):
            assert rel_err(g, r) < 1e-5, key
        assert rel_err(kernels.transform(weight, adapter, math_key(key), 0.7),
                       oracle_weight(key, weight, adapter, 0.7)) < 1e-6, f"{key}: another scale"
