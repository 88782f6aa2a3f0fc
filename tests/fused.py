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
