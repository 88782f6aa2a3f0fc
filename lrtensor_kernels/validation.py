"""Checks of what users hand to the layers, and the opt-in check of non-finite outputs.

Every check takes ``owner``, the label that starts its message (a layer such as
``"FLoRALinear 'head'"``, or a function name), and returns the value in the one type the
package stores (a Python ``int`` or ``float``), so configurations stay JSON-serialisable.
"""
from __future__ import annotations

import math
import numbers
import operator

import torch

from .errors import AdapterConfigError, AdapterTypeError, NonFiniteError


def is_integer(value) -> bool:
    """An int, a numpy integer or a one-element integer tensor; never a bool."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def rank(value, name: str, owner: str) -> int:
    """An integer >= 1 (numpy and torch integer scalars too; bools and floats are refused)."""
    if not is_integer(value) or operator.index(value) < 1:
        raise AdapterConfigError(f"{owner}: {name} must be an integer >= 1, got {value!r}")
    return operator.index(value)


def is_sequence(value) -> bool:
    """A list, tuple or range, or an array or tensor of at least one dimension (not one number)."""
    return isinstance(value, (list, tuple, range)) or getattr(value, "ndim", 0) >= 1


def rank_list(value, name: str, owner: str) -> tuple:
    """Each entry of a sequence (see ``is_sequence``) as a rank."""
    return tuple(rank(r, f"every entry of {name}", owner) for r in value)


def real_number(value, name: str, owner: str) -> float:
    """A finite real number (Python, numpy or a one-element real tensor); bools are refused."""
    number = None
    if isinstance(value, torch.Tensor):
        if value.numel() == 1 and not value.is_complex() and value.dtype != torch.bool:
            number = value.item()
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        number = value
    try:
        number = None if number is None else float(number)
    except OverflowError:
        number = math.inf
    if number is None or not math.isfinite(number):
        raise AdapterConfigError(f"{owner}: {name} must be a finite real number, got {value!r}")
    return number


def probability(value, name: str, owner: str) -> float:
    """A real number in [0, 1)."""
    try:
        p = real_number(value, name, owner)
    except AdapterConfigError:
        p = math.nan
    if not 0.0 <= p < 1.0:
        raise AdapterConfigError(f"{owner}: {name} must be in [0, 1), got {value!r}")
    return p


def choice(value, name: str, options: tuple, owner: str) -> str:
    if not isinstance(value, str) or value not in options:
        raise AdapterConfigError(f"{owner}: unknown {name} {value!r}; expected one of {options}")
    return value


def model(value, owner: str) -> None:
    if not isinstance(value, torch.nn.Module):
        raise AdapterTypeError(f"{owner}: expected an nn.Module, got {type(value).__name__}")


def input_tensor(x, weight: torch.Tensor, owner: str) -> None:
    """nn's rule: a floating tensor on the weight's device, of the weight's dtype; under autocast,
    which casts every floating tensor but a float64 one, unless exactly one of the two is float64."""
    if not isinstance(x, torch.Tensor):
        raise AdapterTypeError(f"{owner}: expected a tensor input, got {type(x).__name__}")
    if not x.is_floating_point():
        raise AdapterTypeError(f"{owner}: expected a floating-point input, got dtype {x.dtype}")
    if x.device != weight.device:
        raise AdapterTypeError(f"{owner}: input on {x.device}, weight on {weight.device}; move one of them")
    if x.dtype == weight.dtype:
        return
    device = x.device.type
    if not (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)):
        raise AdapterTypeError(f"{owner}: input dtype {x.dtype} differs from the weight's {weight.dtype}; "
                               f"convert the input or the layer, or run under torch.autocast")
    if (x.dtype == torch.float64) != (weight.dtype == torch.float64):
        raise AdapterTypeError(f"{owner}: input dtype {x.dtype} differs from the weight's {weight.dtype}, and "
                               f"autocast leaves float64 tensors as they are; convert the input or the layer")


def count_nonfinite(t: torch.Tensor) -> int:
    return int(t.numel() - torch.isfinite(t).sum().item())


def finite_weight(merged: torch.Tensor, base: torch.Tensor, owner: str, action: str) -> None:
    """Refuse to write a ``W'`` holding inf or NaN (``action`` says what was refused). A ``W'`` on the
    meta device holds no values to check."""
    if merged.device.type == "meta" or torch.isfinite(merged).all():
        return
    bad = count_nonfinite(merged)
    cause = ("the base weight already holds non-finite values" if not torch.isfinite(base).all() else
             f"the adapter update overflows in {merged.dtype} (check the adapter tensors and the scale)")
    raise NonFiniteError(f"{owner}: {action} refused: W' would hold {bad} non-finite values of {merged.numel()}; "
                         f"{cause}. Nothing was changed.")
