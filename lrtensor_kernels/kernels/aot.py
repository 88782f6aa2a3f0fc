"""Ahead-of-time compilation records of the Triton kernels.

Every module of Triton kernels lists, in a function ``aot_cases()``, the specialisations its
launchers can produce (dtypes, methods, ranks, block sizes, warps, stages: what changes the
compiled code). Each is an :class:`AotCase`; the ahead-of-time compile test compiles them for
the GPU targets the installed Triton supports, without a GPU, and checks their resources.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class AotCase:
    """One specialisation of one ``@triton.jit`` kernel, as a launcher would launch it.

    ``signature``: argument name -> Triton type string (``"*fp32"``, ``"*bf16"``, ``"i32"``,
    ``"i64"``, ``"fp32"``, ``"constexpr"``); ``constexprs``: the constexpr arguments' values.
    ``name`` says what the case is (kernel, dtypes, method, plan) in a test id.
    """

    name: str
    kernel: Any
    signature: dict
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3
    notes: dict = field(default_factory=dict, compare=False)
