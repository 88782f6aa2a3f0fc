"""mpc_loss (the paper's MPC on LoRA's factors) and tucker_orthogonality_loss (this package's Tucker
extension) on hand-made factors, with expected values worked out by hand from the formulas, and
against the paper's Eqs. 25/26 written out in the paper's own notation."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lrtensor_kernels as lk

F64 = torch.float64


def orthonormal(rows, cols, seed):
    """A (rows, cols) matrix with orthonormal columns (rows >= cols) or rows (rows < cols)."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(max(rows, cols), min(rows, cols), generator=g, dtype=F64)
    q, _ = torch.linalg.qr(m)
    return q if rows >= cols else q.t()


def set_(param, value):
    with torch.no_grad():
        param.copy_(torch.as_tensor(value, dtype=param.dtype))


# ----------------------------------------------------------------------------------------------
# zero for orthonormal factors
# ----------------------------------------------------------------------------------------------
def test_orthonormal_tucker_factors_give_zero():
    model = nn.Sequential(lk.FLoRAConv2d(6, 8, 3, ranks=(4, 3, 2, 2), dtype=F64), lk.FLoRALinear(5, 7, dtype=F64))
    for layer in model:
        for i, u in enumerate(layer.factors):
            set_(u, orthonormal(*u.shape, seed=i))
    loss = lk.tucker_orthogonality_loss(model)
    assert loss.shape == () and abs(loss.item()) < 1e-20
    # a random factor is not orthonormal (the check above can fail)
    with torch.no_grad():
        model[0].factors[1].mul_(1.1)
    assert lk.tucker_orthogonality_loss(model).item() > 1e-3


@pytest.mark.parametrize("cls", [lk.LieRALinear, lk.LoRALinear])
def test_orthonormal_lora_gives_zero_for_kind_o(cls):
    layer = cls(6, 5, rank=3, dtype=F64)
    set_(layer.lora_A, orthonormal(3, 6, seed=0))  # orthonormal rows: A A^T = I
    set_(layer.lora_B, orthonormal(5, 3, seed=1))  # orthonormal columns: B^T B = I
    model = nn.Sequential(layer)
    assert abs(lk.mpc_loss(model, "o").item()) < 1e-20
    assert abs(lk.mpc_loss(model, "d").item()) < 1e-20
    # kind "d" only asks B^T B to be diagonal: an orthogonal B with scaled columns still gives 0 ...
    set_(layer.lora_B, orthonormal(5, 3, seed=1) * torch.tensor([1.0, 2.0, 3.0], dtype=F64))
    assert abs(lk.mpc_loss(model, "d").item()) < 1e-20
    # ... while kind "o" counts (4 - 1)^2 + (9 - 1)^2 = 73
    assert lk.mpc_loss(model, "o").item() == pytest.approx(73.0, rel=1e-12)


# ----------------------------------------------------------------------------------------------
# hand-computed values
# ----------------------------------------------------------------------------------------------
# A = [[1, 2, 0],        A A^T = [[5, 2],      A A^T - I = [[4, 2],     ||.||^2 = 16 + 4 + 4 + 1 = 25
#      [0, 1, 1]]                 [2, 2]]                    [2, 1]]
# B = [[1, 1],           B^T B = [[1, 1],      B^T B - I   = [[0, 1],    ||.||^2 = 0 + 1 + 1 + 16 = 18
#      [0, 2]]                    [1, 5]]                    [1, 4]]
#                                              B^T B - diag = [[0, 1],   ||.||^2 = 2
#                                                              [1, 0]]
A = [[1.0, 2.0, 0.0], [0.0, 1.0, 1.0]]
B = [[1.0, 1.0], [0.0, 2.0]]


@pytest.mark.parametrize("cls", [lk.LieRALinear, lk.LoRALinear])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("kind, expected", [("o", 25.0 + 18.0), ("d", 25.0 + 2.0)])
def test_lora_hand_computed(kind, expected, dtype, cls):
    layer = cls(3, 2, rank=2, dtype=dtype)
    set_(layer.lora_A, A)
    set_(layer.lora_B, B)
    loss = lk.mpc_loss(nn.Sequential(layer), kind)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert loss.requires_grad


def test_lora_conv_hand_computed():
    # conv weight (2, 1, 3): A has shape (rank, 1 * 3)
    layer = lk.LieRAConv1d(1, 2, 3, rank=2, mode="first_order", dtype=F64)
    set_(layer.lora_A, A)
    set_(layer.lora_B, B)
    assert lk.mpc_loss(nn.Sequential(layer), "o").item() == pytest.approx(43.0, rel=1e-12)


# U0 = B above (penalty 18 for U0^T U0 - I); U1 = [[1, 0], [2, 1], [0, 1]]: U1^T U1 = [[5, 2], [2, 2]] -> 25
U1 = [[1.0, 0.0], [2.0, 1.0], [0.0, 1.0]]


def test_tucker_sums_over_modes():
    layer = lk.FLoRALinear(3, 2, ranks=(2, 2), dtype=F64)
    set_(layer.factors[0], B)
    set_(layer.factors[1], U1)
    assert lk.tucker_orthogonality_loss(nn.Sequential(layer)).item() == pytest.approx(18.0 + 25.0, rel=1e-12)


def test_liera_tucker_and_conv_modes():
    # LieRA delta "tucker" on a conv: every mode's factor counts, the kernel modes included
    layer = lk.LieRAConv2d(3, 2, (3, 1), rank=2, delta="tucker", dtype=F64)
    assert [tuple(u.shape) for u in layer.factors] == [(2, 2), (3, 2), (3, 2), (1, 1)]
    set_(layer.factors[0], B)                     # 18
    set_(layer.factors[1], U1)                    # 25
    set_(layer.factors[2], orthonormal(3, 2, 0))  # 0
    set_(layer.factors[3], [[3.0]])               # (9 - 1)^2 = 64
    assert lk.tucker_orthogonality_loss(nn.Sequential(layer)).item() == pytest.approx(18.0 + 25.0 + 64.0,
                                                                                     rel=1e-12)


def test_sum_over_layers_each_loss_its_own_layers():
    liera = lk.LieRALinear(3, 2, rank=2, dtype=F64)
    set_(liera.lora_A, A)
    set_(liera.lora_B, B)
    lora = lk.LoRALinear(3, 2, rank=2, dtype=F64)
    set_(lora.lora_A, A)
    set_(lora.lora_B, B)
    tucker = lk.FLoRALinear(3, 2, ranks=(2, 2), dtype=F64)
    set_(tucker.factors[0], B)
    set_(tucker.factors[1], U1)
    ssl = lk.SSLConv2d(3, 4, 3, dtype=F64)
    model = nn.Sequential(ssl, nn.ReLU(), liera, nn.Sequential(tucker, lk.SSBLinear(2, 2)), lora)
    assert lk.mpc_loss(model, "o", tucker_factors=False).item() == pytest.approx(43.0 + 43.0, rel=1e-12)
    assert lk.mpc_loss(model, "d", tucker_factors=False).item() == pytest.approx(27.0 + 27.0, rel=1e-12)
    assert lk.tucker_orthogonality_loss(model).item() == pytest.approx(43.0, rel=1e-12)
    assert lk.mpc_loss(model, "o", tucker_factors=True).item() == pytest.approx(43.0 + 43.0 + 43.0, rel=1e-12)


def test_gradient_matches_hand_formula():
    # d/dU ||U^T U - I||_F^2 = 4 U (U^T U - I)
    layer = lk.FLoRALinear(3, 2, ranks=(2, 2), dtype=F64)
    set_(layer.factors[0], B)
    set_(layer.factors[1], U1)
    lk.tucker_orthogonality_loss(nn.Sequential(layer)).backward()
    for u in layer.factors:
        w = u.detach()
        expected = 4 * w @ (w.t() @ w - torch.eye(2, dtype=F64))
        torch.testing.assert_close(u.grad, expected, rtol=1e-12, atol=1e-12)
    assert layer.core.grad is None


def test_lora_gradient_matches_hand_formula():
    # kind "d": d/dB ||B^T B - diag(B^T B)||^2 = 4 B offdiag(B^T B); d/dA ||A A^T - I||^2 = 4 (A A^T - I) A
    layer = lk.LieRALinear(3, 2, rank=2, dtype=F64)
    set_(layer.lora_A, A)
    set_(layer.lora_B, B)
    lk.mpc_loss(nn.Sequential(layer), "d").backward()
    a, b = torch.tensor(A, dtype=F64), torch.tensor(B, dtype=F64)
    gram = b.t() @ b
    torch.testing.assert_close(layer.lora_B.grad, 4 * b @ (gram - torch.diag(torch.diag(gram))))
    torch.testing.assert_close(layer.lora_A.grad, 4 * (a @ a.t() - torch.eye(2, dtype=F64)) @ a)


# ----------------------------------------------------------------------------------------------
# no factors / errors
# ----------------------------------------------------------------------------------------------
def test_ssl_only_model_gives_zero():
    model = nn.Sequential(lk.SSLConv2d(3, 4, 3), nn.ReLU(), lk.SSBLinear(4, 2))
    with torch.no_grad():
        model[0].in_scale.mul_(3.0)
    loss = lk.mpc_loss(model)
    assert torch.is_tensor(loss) and loss.shape == () and loss.item() == 0.0


def test_injected_model_default_kind_is_o():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Linear(4, 2))
    lk.inject(model, "liera", rank=2)
    set_(model[2].lora_A, [[1.0, 2.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0]])  # A A^T as above: 25
    set_(model[2].lora_B, B)                                            # B^T B - I: 18
    set_(model[0].lora_A, orthonormal(2, 27, seed=3))
    set_(model[0].lora_B, orthonormal(4, 2, seed=4))
    assert lk.mpc_loss(model).item() == pytest.approx(43.0, rel=1e-5)


@pytest.mark.parametrize("loss", [lk.mpc_loss, lk.tucker_orthogonality_loss])
def test_model_without_adapters_raises(loss):
    with pytest.raises(lk.AdapterConfigError, match="Sequential has no adapter layer"):
        loss(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Linear(4, 2)))


@pytest.mark.parametrize("kind", ["x", "O", "orthogonal", "", None])
def test_unknown_kind_raises(kind):
    model = nn.Sequential(lk.LoRALinear(3, 2))
    with pytest.raises(lk.AdapterConfigError, match=f"unknown MPC kind {kind!r}"):
        lk.mpc_loss(model, kind)


def test_mpc_adds_the_tucker_extension_only_when_asked():
    model = nn.Sequential(lk.FLoRAConv2d(3, 4, 3), lk.SSLLinear(4, 2), lk.LieRALinear(2, 2, delta="tucker"),
                          lk.LoRALinear(2, 3, rank=2))
    lora_only = lk.mpc_loss(nn.Sequential(model[3]), "o").item()
    tucker = lk.tucker_orthogonality_loss(model).item()
    assert tucker > 1e-3 and lora_only > 1e-3
    assert lk.mpc_loss(model, "o", tucker_factors=True).item() == pytest.approx(lora_only + tucker, rel=1e-6)
    for kind in ("o", "d"):  # unasked, neither adds terms the paper does not define nor skips layers silently
        with pytest.raises(lk.AdapterConfigError, match=r"FLoRAConv2d has Tucker factors.*tucker_factors=True.*"
                                                        r"tucker_factors=False"):
            lk.mpc_loss(model, kind)
    assert lk.mpc_loss(model, "o", tucker_factors=False).item() == pytest.approx(lora_only, rel=1e-6)
    assert lk.mpc_loss(model, "d", tucker_factors=False).item() == pytest.approx(
        lk.mpc_loss(nn.Sequential(model[3]), "d").item(), rel=1e-6)
    assert lk.mpc_loss(nn.Sequential(model[0]), tucker_factors=False).item() == 0.0
    with pytest.raises(lk.AdapterConfigError, match=r"kind 'd' on FLoRAConv2d, whose Tucker factors have no diagonal "
                                                    r"form.*tucker_factors=False"):
        lk.mpc_loss(model, "d", tucker_factors=True)
    with pytest.raises(lk.AdapterTypeError, match="tucker_factors must be True, False or None"):
        lk.mpc_loss(model, "o", tucker_factors=1)


# ----------------------------------------------------------------------------------------------
# the paper's Eqs. 25/26, written in the paper's notation: W (n, m) on row vectors, dW = A B
# ----------------------------------------------------------------------------------------------
def paper_mpc(A_paper, B_paper, kind):
    """Eq. 25 (o) / Eq. 26 (d) exactly as printed, for A (n, r) and B (r, m)."""
    r = A_paper.shape[1]
    eye = torch.eye(r, dtype=F64)
    first = torch.linalg.matrix_norm(A_paper.T @ A_paper - eye) ** 2
    bbt = B_paper @ B_paper.T
    second = torch.linalg.matrix_norm(bbt - (eye if kind == "o" else torch.diag(torch.diagonal(bbt)))) ** 2
    return first + second


@pytest.mark.parametrize("kind", ["o", "d"])
@pytest.mark.parametrize("make", [
    lambda: lk.LoRALinear(7, 5, rank=3, dtype=F64),
    lambda: lk.LoRAConv2d(4, 6, 3, rank=5, dtype=F64),
    lambda: lk.LoRAConv2d(4, 6, 3, groups=2, rank=2, dtype=F64),
    lambda: lk.LoRAConv1d(3, 2, 4, rank=4, dtype=F64),
    lambda: lk.LieRAConv3d(2, 3, 2, rank=3, dtype=F64),
], ids=["lora-linear", "lora-conv2d", "lora-conv2d-groups", "lora-conv1d", "liera-conv3d"])
def test_mpc_on_lora_factors_is_the_papers(make, kind):
    """With the paper's A = lora_A^T (the down projection) and B = lora_B^T (the up projection):
    ``x W_paper`` with ``W_paper = W^T`` is our ``W x``, and ``dW_paper = A B`` is our ``(lora_B lora_A)^T``."""
    torch.manual_seed(0)
    layer = make()
    with torch.no_grad():
        for p in layer.adapter_parameters():
            p.normal_()
    A_paper, B_paper = layer.lora_A.detach().T, layer.lora_B.detach().T
    delta = lk.methods.delta("lora", [t.detach() for t in layer.adapter_tensors()], layer.weight.shape)
    torch.testing.assert_close(A_paper @ B_paper, delta.reshape(layer.weight.shape[0], -1).T)
    got = lk.mpc_loss(nn.Sequential(layer), kind)
    assert got.item() == pytest.approx(paper_mpc(A_paper, B_paper, kind).item(), rel=1e-12)
    # the other reading of the notation (A the up projection) gives another value: the test can fail
    if kind == "d":
        swapped = paper_mpc(layer.lora_B.detach(), layer.lora_A.detach(), kind)
        assert abs(swapped.item() - got.item()) > 1e-6 * abs(got.item())


def test_zero_initialised_up_projection_satisfies_the_diagonal_form():
    """MPC_d asks only orthogonal up-projection directions: LoRA's B starts at zero and pays nothing
    for it, while MPC_o charges its r unit norms (r^2 ... here r: ||0 - I||^2 = r)."""
    layer = lk.LoRALinear(16, 12, rank=4, dtype=F64)
    a = layer.lora_A.detach()
    a_term = gram_penalty_by_hand(a @ a.T)
    assert lk.mpc_loss(nn.Sequential(layer), "d").item() == pytest.approx(a_term, rel=1e-12)
    assert lk.mpc_loss(nn.Sequential(layer), "o").item() == pytest.approx(a_term + 4.0, rel=1e-12)


def gram_penalty_by_hand(gram):
    return ((gram - torch.eye(gram.shape[0], dtype=gram.dtype)) ** 2).sum().item()
