"""The fused transform's ``W' - W`` for LieRA exp (an expm1) against the float64 oracle, in float64."""
from __future__ import annotations

import math

import pytest
import torch

from oracle import F64, rel_err, tucker64

pytest.importorskip("triton")
from lrtensor_kernels.kernels import triton_transform as tt  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_expm1_elementwise_to_float64_precision():
    """Rank one, so each E = scale * B[o] * A[c] is one rounded product: every element of
    W * expm1(E) must be within a few ulps, for E from 1e-12 to 3 in size, on both sides of the
    series' switch at |E| = 1/2 (exp(E) - 1 would lose all digits at 1e-12)."""
    magnitudes = torch.cat([torch.logspace(-12, math.log10(3.0), 61, dtype=F64),
                            torch.linspace(0.49, 0.51, 9, dtype=F64)])
    lora_B = torch.cat([magnitudes, -magnitudes]).reshape(-1, 1)
    lora_A = torch.tensor([[1.0, 0.75, 1 / 3, 1e-3]], dtype=F64)
    weight = torch.randn(lora_B.shape[0], 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    got = tt.transform(weight.to(DEVICE), [lora_B.to(DEVICE), lora_A.to(DEVICE)], "lora:exp", 1.0,
                       delta_only=True).cpu()
    ref = weight * torch.expm1(lora_B * lora_A)
    assert ((got - ref).abs() / ref.abs()).max().item() < 4e-16 * 8


@pytest.mark.parametrize("key", ["lora:exp", "tucker:exp"])
@pytest.mark.parametrize("shape", [(37, 70), (12, 5, 3, 3), (6, 3, 2, 3, 2)], ids=["linear", "conv2d", "conv3d"])
@pytest.mark.parametrize("scale", [0.05, 1.0, 4.0])
def test_delta_only_exp_matches_float64_oracle(key, shape, scale):
    g = torch.Generator().manual_seed(sum(shape))
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    weight = rnd(*shape)
    if key == "lora:exp":
        adapter = [0.3 * rnd(shape[0], 3), 0.3 * rnd(3, math.prod(shape[1:]))]
        update = (adapter[0] @ adapter[1]).reshape(shape)
    else:
        ranks = [min(d, 3) for d in shape]
        adapter = [0.5 * rnd(*ranks)] + [rnd(d, r) / math.sqrt(r) for d, r in zip(shape, ranks)]
        update = tucker64(adapter[0], adapter[1:])
    out = torch.full(shape, float("nan"), dtype=F64, device=DEVICE)  # poisoned
    got = tt.transform(weight.to(DEVICE), [t.to(DEVICE) for t in adapter], key, scale, delta_only=True, out=out)
    ref = weight * torch.expm1(scale * update)
    if scale == 4.0:  # both branches of the kernel's expm1 are used
        assert (scale * update).abs().max() > 0.5 > (scale * update).abs().min()
    assert rel_err(got, ref) < 1e-14
