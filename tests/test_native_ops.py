"""The native ops themselves (torch.ops.lrtensor.*): registration checks (opcheck) and the
argument checks at the C++ boundary."""
from __future__ import annotations

import pytest
import torch

from fused import fused_kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def ops():
    fused_kernels("native")
    return torch.ops.lrtensor


def _operands(rows=20, cols=45, rank=3, dtype=torch.float32, acc=torch.float32):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(rows, 5, cols // 5, generator=g).to(DEVICE, dtype)
    left = torch.randn(rows, rank, generator=g).to(DEVICE, acc)
    right = torch.randn(rank, cols, generator=g).to(DEVICE, acc)
    return weight, left, right


def test_opcheck_lowrank_transform(ops):
    weight, left, right = _operands()
    for combine in ("add", "exp", "first_order", "mul"):
        torch.library.opcheck(ops.lowrank_transform.default, (weight, left, right, combine, True))
    torch.library.opcheck(ops.lowrank_transform.default, (weight, left, right, "exp"), {"dtype": torch.bfloat16})
    out = torch.empty_like(weight)
    torch.library.opcheck(ops.lowrank_transform.out, (weight, left, right, "exp", False), {"out": out})


def test_opcheck_lowrank_project(ops):
    weight, left, right = _operands()
    grad = torch.randn_like(weight)
    for combine in ("add", "exp"):
        torch.library.opcheck(ops.lowrank_project.default, (grad, weight, left, right, combine))
    torch.library.opcheck(ops.lowrank_project.out, (grad, weight, left, right, "mul"),
                          {"grad_left": torch.empty_like(left), "grad_right": torch.empty_like(right)})


def test_opcheck_lowrank_project_transform(ops):
    if DEVICE != "cpu":
        pytest.skip("a CPU kernel only")
    weight, left, right = _operands()
    grad = torch.randn_like(weight)
    for combine in ("add", "exp", "mul"):
        torch.library.opcheck(ops.lowrank_project_transform.default, (grad, weight, left, right, combine, True))
    torch.library.opcheck(ops.lowrank_project_transform.default, (grad, weight, left, right, "exp"),
                          {"dtype": torch.bfloat16})
    torch.library.opcheck(ops.lowrank_project_transform.out, (grad, weight, left, right, "first_order", False),
                          {"grad_left": torch.empty_like(left), "grad_right": torch.empty_like(right),
                           "out": torch.empty_like(weight)})


def test_opcheck_channel_dot(ops):
    a, b = torch.randn(3, 6, 4, 5, device=DEVICE), torch.randn(3, 6, 4, 5, device=DEVICE)
    for dim in (0, 1, -1):
        torch.library.opcheck(ops.channel_dot.default, (a, b, dim))
    torch.library.opcheck(ops.channel_dot.out, (a, b, 1), {"out": torch.empty(6, device=DEVICE)})


def test_opcheck_mode_contractions(ops):
    x, u = torch.randn(4, 5, 6, device=DEVICE), torch.randn(7, 5, device=DEVICE)
    torch.library.opcheck(ops.mode_product.default, (x, u, 1))
    torch.library.opcheck(ops.mode_gram.default, (x, torch.randn(4, 3, 6, device=DEVICE), 1))


def test_mode_contractions_match_tensordot(ops):
    from lrtensor_kernels import methods

    x = torch.randn(4, 5, 6, 3, dtype=torch.float64, device=DEVICE)
    for mode in range(4):
        u = torch.randn(7, x.shape[mode], dtype=torch.float64, device=DEVICE)
        assert torch.allclose(ops.mode_product(x, u, mode), methods.mode_product(x, u, mode), rtol=1e-13, atol=1e-13)
        y = torch.randn(x.shape[:mode] + (2,) + x.shape[mode + 1:], dtype=torch.float64, device=DEVICE)
        assert torch.allclose(ops.mode_gram(x, y, mode), methods.mode_gram(x, y, mode), rtol=1e-13, atol=1e-13)



# around the CPU kernels' register blocks (16 rows of j or m, 4 inner columns or rows of j at a
# time): shapes (outer, mode size, inner) and the other operand's size, with every tail of a block
CONTRACTIONS = [((3, 5, 9), 17), ((2, 16, 4), 16), ((1, 7, 1), 33), ((4, 40, 3), 1), ((2, 3, 13), 2),
                ((5, 1, 6), 31), ((1, 9, 5), 15), ((2, 0, 3), 5), ((0, 4, 3), 6), ((2, 4, 0), 6)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mode_contractions_exact_in_every_block_tail(ops, dtype):
    """Every element of a poisoned output, against the exact value of the same (rounded) inputs:
    the sums run in float64, so a float32 result is that value rounded once."""
    g = torch.Generator().manual_seed(3)
    for (outer, size, inner), other in CONTRACTIONS:
        x = torch.randn(outer, size, inner, generator=g, dtype=torch.float64).to(dtype)
        u = torch.randn(other, size, generator=g, dtype=torch.float64).to(dtype)
        y = torch.randn(outer, other, inner, generator=g, dtype=torch.float64).to(dtype)
        x64, u64, y64 = x.double(), u.double(), y.double()
        cases = [(ops.mode_product.out, (x, u, 1), torch.einsum("pmq,jm->pjq", x64, u64),
                  torch.einsum("pmq,jm->pjq", x64.abs(), u64.abs())),
                 (ops.mode_gram.out, (x, y, 1), torch.einsum("pjq,pmq->jm", x64, y64),
                  torch.einsum("pjq,pmq->jm", x64.abs(), y64.abs()))]
        for op, args, exact, magnitude in cases:
            out = torch.full(exact.shape, float("nan"), dtype=dtype, device=DEVICE)
            op(*(a.to(DEVICE) for a in args[:2]), args[2], out=out)
            rounding = 2.0 ** -24 if dtype == torch.float32 else 0.0
            bound = rounding * exact.abs() + 1e-14 * magnitude + 1e-300
            assert ((out.cpu().double() - exact).abs() <= bound).all(), (op, (outer, size, inner), other)


def test_mode_contractions_same_bits_at_any_thread_count(ops):
    """Many tasks at two threads; every element is summed by one task in one order."""
    if DEVICE != "cpu":
        pytest.skip("CPU threads")
    g = torch.Generator().manual_seed(4)
    core, u2 = torch.randn(16, 16, 9, generator=g), torch.randn(1300, 16, generator=g)
    grad_r = torch.randn(16, 1300, 9, generator=g)
    results = {}
    for threads in (1, 2):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            results[threads] = (ops.mode_product(core, u2, 1), ops.mode_product(grad_r, u2.t().contiguous(), 1),
                                ops.mode_gram(grad_r, core, 1))
        finally:
            torch.set_num_threads(previous)
    assert all(torch.equal(a, b) for a, b in zip(results[1], results[2]))

def test_ops_run_under_compile(ops):
    weight, left, right = _operands()

    def step(w, l, r):
        out = ops.lowrank_transform(w, l, r, "exp")
        grad_left, grad_right = ops.lowrank_project(out, w, l, r, "exp")
        return ops.channel_dot(out, w, 0), grad_left, grad_right

    eager = step(weight, left, right)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager", dynamic=True)(weight, left, right)
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled))


# ---------------------------------------------------------------------------------------------
# bad input: an error that names the op, what was expected and what was given; nothing written
# ---------------------------------------------------------------------------------------------
def _unchanged_after_error(out, call, match):
    before = out.clone()
    with pytest.raises(RuntimeError, match=match):
        call()
    assert torch.equal(out, before)


def test_transform_rejects_bad_operands(ops):
    weight, left, right = _operands()
    out = torch.zeros_like(weight)
    transform = ops.lowrank_transform.out
    cases = [
        ((weight, left, right[:, :-1], "add"), r"lrtensor::lowrank_transform: expected right of shape \(r, C\) = "
                                                r"\(3, 45\), got \[3, 44\]"),
        ((weight, left[:-1], right, "add"), r"lrtensor::lowrank_transform: expected left of shape \(O, r\) = "
                                            r"\(20, 3\), got \[19, 3\]"),
        ((weight, left.double(), right, "add"), r"lrtensor::lowrank_transform: expected left of dtype Float \(the "
                                                r"accumulation type of the weight\), got Double"),
        ((weight.transpose(1, 2), left, right, "add"), r"lrtensor::lowrank_transform: expected a contiguous weight"),
        ((weight, left, right, "tanh"), r"lrtensor::lowrank_transform: expected combine 'add', 'exp', "
                                        r"'first_order' or 'mul', got 'tanh'"),
        ((weight.int(), left, right, "add"), r"lrtensor::lowrank_transform: expected weight of dtype float32, "
                                             r"float64, float16 or bfloat16, got Int"),
        ((weight[0], left, right, "add"), r"lrtensor::lowrank_transform: expected left of shape \(O, r\) = "
                                          r"\(5, 3\), got \[20, 3\]"),
        ((weight, left[:, :0], right[:0], "add"), r"lrtensor::lowrank_transform: expected a rank r >= 1"),
    ]
    for args, match in cases:
        _unchanged_after_error(out, lambda: transform(*args, out=out), match)
    with pytest.raises(RuntimeError, match=r"lrtensor::lowrank_transform: expected out of the weight's shape "
                                           r"\[20, 5, 9\], got \[20, 45\]"):
        transform(weight, left, right, "add", out=torch.empty(20, 45, device=DEVICE))
    with pytest.raises(RuntimeError, match=r"lrtensor::lowrank_transform: expected a weight of at least 2 dimensions"):
        transform(weight.flatten(), left, right, "add", out=out.flatten())


def test_project_rejects_bad_operands(ops):
    weight, left, right = _operands()
    grad_left, grad_right = torch.zeros_like(left), torch.zeros_like(right)
    cases = [
        ((weight[:, :4], weight, left, right), r"lrtensor::lowrank_project: expected grad of the weight's shape "
                                               r"\[20, 5, 9\], got \[20, 4, 9\]"),
        ((weight, weight, left, right, grad_left[:, :2]), r"lrtensor::lowrank_project: expected grad_left of shape "
                                                          r"left's \(O, r\) = \(20, 3\), got \[20, 2\]"),
        ((weight, weight, left, right, grad_left.double()), r"lrtensor::lowrank_project: expected grad_left of dtype "
                                                            r"Float \(left's\), got Double"),
    ]
    for args, match in cases:
        gl = args[4] if len(args) == 5 else grad_left
        _unchanged_after_error(grad_right, lambda: ops.lowrank_project.out(*args[:4], "add", grad_left=gl,
                                                                            grad_right=grad_right), match)


def test_project_transform_rejects_bad_operands(ops):
    weight, left, right = _operands()
    grad_left, grad_right, out = torch.zeros_like(left), torch.zeros_like(right), torch.zeros_like(weight)
    op = ops.lowrank_project_transform.out
    cases = [
        (dict(grad=weight[:, :4]), r"lrtensor::lowrank_project_transform: expected grad of the weight's shape "
                                   r"\[20, 5, 9\], got \[20, 4, 9\]"),
        (dict(right=right[:, :-1]), r"lrtensor::lowrank_project_transform: expected right of shape \(r, C\) = "
                                    r"\(3, 45\), got \[3, 44\]"),
        (dict(grad_left=grad_left[:, :2]), r"lrtensor::lowrank_project_transform: expected grad_left of shape "
                                           r"left's \(O, r\) = \(20, 3\), got \[20, 2\]"),
        (dict(out=out.flatten(1)), r"lrtensor::lowrank_project_transform: expected out of the weight's shape "
                                   r"\[20, 5, 9\], got \[20, 45\]"),
        (dict(out=torch.zeros(20, 9, 5).transpose(1, 2)), r"lrtensor::lowrank_project_transform: expected a contiguous out"),
        (dict(combine="tanh"), r"lrtensor::lowrank_project_transform: expected combine 'add', 'exp', 'first_order' "
                               r"or 'mul', got 'tanh'"),
    ]
    for change, match in cases:
        args = dict(grad=weight, weight=weight, left=left, right=right, combine="exp", grad_left=grad_left,
                    grad_right=grad_right, out=out)
        args.update(change)
        for written in (out, grad_left, grad_right):
            _unchanged_after_error(written, lambda: op(args["grad"], args["weight"], args["left"], args["right"],
                                                       args["combine"], False, grad_left=args["grad_left"],
                                                       grad_right=args["grad_right"], out=args["out"]), match)


def test_channel_dot_rejects_bad_operands(ops):
    a = torch.randn(2, 3, 4, device=DEVICE)
    out = torch.zeros(3, device=DEVICE)
    cases = [
        ((a, a[:, :, :3], 1), r"lrtensor::channel_dot: expected b of a's shape \[2, 3, 4\], got \[2, 3, 3\]"),
        ((a, a.double(), 1), r"lrtensor::channel_dot: expected b of dtype Float \(a's\), got Double"),
        ((a, a, 3), r"lrtensor::channel_dot: expected channel_dim in \[-3, 3\) for a of shape \[2, 3, 4\], got 3"),
        ((a.transpose(0, 2), a.transpose(0, 2), 1), r"lrtensor::channel_dot: expected a contiguous a"),
        ((a, a, 0), r"lrtensor::channel_dot: expected out of shape \(2,\) \(a.shape\[channel_dim\]\), got \[3\]"),
    ]
    for args, match in cases:
        _unchanged_after_error(out, lambda: ops.channel_dot.out(*args, out=out), match)
    with pytest.raises(RuntimeError, match=r"lrtensor::channel_dot: expected out of dtype Float \(float64 for "
                                           r"float64 inputs, else float32\), got Half"):
        ops.channel_dot.out(a, a, 1, out=out.half())


def test_mode_contractions_reject_bad_operands(ops):
    x = torch.randn(4, 5, 6, device=DEVICE)
    with pytest.raises(RuntimeError, match=r"lrtensor::mode_product: expected u of shape \(J, 5\) \(x.shape\[mode\] = "
                                           r"5\), got \[7, 4\]"):
        ops.mode_product(x, torch.randn(7, 4, device=DEVICE), 1)
    with pytest.raises(RuntimeError, match=r"lrtensor::mode_gram: expected y of x's shape \[4, 5, 6\] in every dim "
                                           r"but 1, got \[4, 3, 5\]"):
        ops.mode_gram(x, torch.randn(4, 3, 5, device=DEVICE), 1)
    with pytest.raises(RuntimeError, match=r"lrtensor::mode_product: expected mode in \[0, 3\) for x of shape "
                                           r"\[4, 5, 6\], got 3"):
        ops.mode_product(x, torch.randn(7, 6, device=DEVICE), 3)
    with pytest.raises(RuntimeError, match=r"lrtensor::mode_product: expected u of dtype float32 or float64, "
                                           r"got Half"):
        ops.mode_product(x, torch.randn(7, 5, device=DEVICE).half(), 1)
