"""FLoRA's chain strategies ("bypass", "hybrid") in a given form, whatever the cost model prefers:
``"three"`` (P_in, op_K, P_out) or ``"folded"`` (P_in folded into op_K), for tests of both."""
from __future__ import annotations

import contextlib

import pytest

from lrtensor_kernels.strategies import cost

FORMS = ("three", "folded")


def _clear():
    cost._decision_cached.cache_clear()


@contextlib.contextmanager
def chain_form(form: str):
    """Within the block every chain strategy runs in ``form`` ("three" or "folded"); "" changes nothing."""
    if not form:
        yield
        return
    folded = {"three": False, "folded": True}[form]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cost, "_cheapest", lambda w, make: make(w, folded))
        _clear()
        try:
            yield
        finally:
            _clear()


def strategy_and_form(name: str) -> tuple:
    """``"bypass:folded"`` -> ``("bypass", "folded")``; ``"merged"`` -> ``("merged", "")``."""
    strategy, _, form = name.partition(":")
    return strategy, form


def flora_strategies() -> list:
    """Every strategy FLoRA can run, the chain strategies in both forms."""
    return ["merged", "two_branch"] + [f"{s}:{f}" for s in ("bypass", "hybrid") for f in FORMS]
