"""``--verify``: every provider against its oracle, on the same input and output gradient.

A provider's oracle computes the same function from the same tensors by another route:

- ``<method>_native``, ``<method>_triton`` and ``<method>_compiled``: the same layer on backend
  "reference";
- ``<method>_reference``: ``F.conv2d`` / ``F.linear`` on the layer's ``effective_weight()``;
- the LoRA baselines (``torch_lora``, ``peft_lora``, ``lycoris_locon[:bypass]``): the base op plus one
  op with the kernel ``scaling * up @ down``, the scaling the bench asked for (not the layer's own);
- ``frozen`` and ``full_ft``: ``F.conv2d`` / ``F.linear`` on the layer's own weight.

Compared: the output, the input gradient and the gradient of every trainable tensor, as relative
errors ``||got - want|| / ||want||`` in float64. On CUDA, TF32 is switched off while checking, so
that float32 is compared as float32.

Where the two disagree by more than the tolerance and the provider has a float64 route (the adapter
layers: a float64 copy on backend "reference"), that route arbitrates with the tests' accuracy rule:
a result is fine when its error against float64 is at most twice the oracle's plus the tolerance.
Two low-precision routes can both be far from an ill-conditioned result: SSL's scale gradient on a
depthwise convolution is one sum of every activation's product with its bfloat16-rounded gradient
(19 million of them on convnext_t/dw7x7_96_56), a sum that cancels: there the Triton and the
reference route differ by 16% while each is within 11% of float64 (bench/NOTES.md).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

from bench.timing import Step

TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10, torch.bfloat16: 3e-2, torch.float16: 1e-2}


@dataclass
class Check:
    shape: str
    provider: str
    oracle: str
    status: str  # "ok", "MISMATCH", "error", "skipped"
    output: Optional[float] = None
    grad_input: Optional[float] = None
    grad_params: Optional[float] = None
    tolerance: Optional[float] = None
    note: str = ""
    # where float64 arbitrated: the worst quantity's errors against float64, the provider's and the oracle's
    float64_errors: Optional[dict] = None


def relative_error(got: Optional[torch.Tensor], want: Optional[torch.Tensor]) -> float:
    """``||got - want|| / ||want||`` in float64; infinite when exactly one of them is missing."""
    if got is None or want is None:
        return 0.0 if got is None and want is None else float("inf")
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).norm() / want.norm().clamp_min(torch.finfo(torch.float64).tiny))


def _gradients(step: Step) -> tuple:
    """Output, input gradient and trainable gradients of one forward+backward of ``step``."""
    step.clear_grads()
    y = step.run()
    grads = [None if t.grad is None else t.grad.clone() for t in step.trainable]
    return y.clone(), step.x.grad.clone(), grads


@contextlib.contextmanager
def exact_float32(device: torch.device):
    """TF32 off for matmuls and cuDNN while the block runs (CUDA only), restored after."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def check_provider(shape_name: str, provider: str, prepared, x, grad_out, dtype) -> Check:
    """One provider against its oracle on ``x`` and ``grad_out``."""
    if prepared.oracle is None:
        return Check(shape_name, provider, "-", "skipped", note="no oracle")
    got = _gradients(Step(prepared.forward, x, grad_out, prepared.trainable))
    want = _gradients(Step(prepared.oracle, x, grad_out, prepared.trainable))
    param_errors = [relative_error(g, w) for g, w in zip(got[2], want[2])]
    check = Check(shape_name, provider, prepared.oracle_name, "ok", relative_error(got[0], want[0]),
                  relative_error(got[1], want[1]), max(param_errors) if param_errors else None,
                  TOLERANCE[dtype])
    worst = max(e for e in (check.output, check.grad_input, check.grad_params) if e is not None)
    if worst <= check.tolerance:
        return check
    if prepared.float64 is None:
        check.status = "MISMATCH"
        return check
    exact = prepared.float64(x, grad_out)
    pairs = [(got[0], want[0], exact[0]), (got[1], want[1], exact[1]), *zip(got[2], want[2], exact[2])]
    arbitrated = [(relative_error(g, e), relative_error(w, e)) for g, w, e in pairs
                  if not relative_error(g, w) <= check.tolerance]
    provider_error, oracle_error = max(arbitrated, key=lambda pair: pair[0] - 2 * pair[1])
    check.float64_errors = {"provider": provider_error, "oracle": oracle_error}
    if all(e_got <= 2 * e_want + check.tolerance for e_got, e_want in arbitrated):
        check.note = (f"against float64: {provider_error:.1e}, the oracle {oracle_error:.1e} (at most twice the "
                      f"oracle's error plus the tolerance)")
    else:
        check.status = "MISMATCH"
        check.note = f"against float64: {provider_error:.1e}, the oracle {oracle_error:.1e}"
    return check


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1e}"


def format_check(check: Check) -> str:
    head = f"{check.shape:<34} {check.provider:<22}"
    if check.status in ("error", "skipped"):
        return f"{head} {check.status}: {check.note}"
    return (f"{head} out {_fmt(check.output):>8}  grad_in {_fmt(check.grad_input):>8}  "
            f"grad_params {_fmt(check.grad_params):>8}  (tol {check.tolerance:.0e}, vs {check.oracle})  "
            f"{check.status}" + (f"; {check.note}" if check.note else ""))
