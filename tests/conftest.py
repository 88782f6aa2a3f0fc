import os

import pytest
import torch

# Without a GPU, the Triton kernels run under the interpreter; it must be on before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _auto_backend_by_default():
    import lrtensor_kernels as lk

    with lk.use_backend("auto"):
        yield


@pytest.fixture
def reference_backend(_auto_backend_by_default):
    """For tests of the reference path, whatever the device."""
    import lrtensor_kernels as lk

    with lk.use_backend("reference"):
        yield


@pytest.fixture(autouse=True, scope="session")
def _exact_float32_on_cuda():
    """float32 in the tests means IEEE float32 products on CUDA too. cuDNN may use TF32 for float32
    convolutions by default, and so do the fused kernels, which follow the same flag; but cuDNN
    picks exact algorithms for the tests' small grouped layers, so with TF32 on, the fused
    kernels' error (about 1e-3, measured on an H200) faced a plain error of 1e-7. With both flags
    off, both sides compute in float32. (On the CPU nothing reads them but the ahead-of-time
    cases, which record the TF32 variants as on a default CUDA setup: left alone there.)"""
    if not torch.cuda.is_available():
        yield
        return
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The tests' ops are tiny: intra-op threads only add synchronisation (several times slower on a
    busy 2-core machine). LRTENSOR_TEST_THREADS=n runs them at n threads (the suite passes at any)."""
    n = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("LRTENSOR_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True, scope="session")
def _interpreter_rounds_as_a_gpu():
    """Under TRITON_INTERPRET=1, tf32 dots and float32 -> bfloat16 casts round as on a GPU
    (tests/gpu_rounding.py), so that the accuracy tests see the GPU's error."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    try:
        from triton.runtime.interpreter import InterpreterBuilder
    except ImportError:
        yield
        return
    from gpu_rounding import rounding_cast, tf32_dot

    originals = InterpreterBuilder.create_dot, InterpreterBuilder.cast_impl
    InterpreterBuilder.create_dot = tf32_dot(originals[0])
    InterpreterBuilder.cast_impl = rounding_cast(originals[1])
    yield
    InterpreterBuilder.create_dot, InterpreterBuilder.cast_impl = originals
