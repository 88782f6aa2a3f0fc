"""The fused backends under test and their kernel modules."""
from __future__ import annotations

import pytest

FUSED_BACKENDS = ("triton", "native")


def fused_kernels(name: str):
    """The kernel module of fused backend ``name``. Skips when triton is not installed, or for
    native when the machine has no C++ compiler; fails when native did not build where one exists."""
    if name == "triton":
        pytest.importorskip("triton")
    else:
        from lrtensor_kernels.kernels import native_build

        if not native_build.available():
            if native_build.compiler() is None:
                pytest.skip(f"native backend: {native_build.unavailable_reason()}")
            pytest.fail(f"the native backend did not build on a machine with a C++ compiler: "
                        f"{native_build.unavailable_reason()}")
    from lrtensor_kernels.ops import kernels_for

    return kernels_for(name)


def compiled_matches_eager(model, x, device: str, backend: str):
    """One forward and backward of ``model`` eagerly and under ``torch.compile(fullgraph=True)``
    (inductor on CUDA, aot_eager on the CPU) on ``backend``: the same output and gradients."""
    import torch

    import lrtensor_kernels as lk
    from oracle import rel_err

    with lk.use_backend(backend):
        model.zero_grad()
        eager = model(x)
        eager.sum().backward()
        eager_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        model.zero_grad()
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
        out = compiled(x)
        out.sum().backward()
    assert rel_err(out, eager) < 1e-6
    for g, e in zip([p.grad for p in model.parameters() if p.requires_grad], eager_grads):
        assert rel_err(g, e) < 1e-5
