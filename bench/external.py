"""The real PEFT and LyCORIS LoRA layers as benchmark providers (optional: ``pip install -e ".[compare]"``).

- ``peft_lora``: PEFT's LoRA (``peft.inject_adapter_in_model`` with a ``LoraConfig``) on the layer:
  ``lora.Linear`` / ``lora.Conv2d``, ``base(x) + scaling * B(A(x))`` (a bypass: the frozen op plus
  the rank-r chain). PEFT refuses a grouped convolution whose rank is not a multiple of its
  groups (the depthwise rows): that row is skipped with PEFT's message.
- ``lycoris_locon``: LyCORIS's LoCon (``lycoris.modules.locon.LoConModule``) in its default
  weight-rebuild mode: ``op(x, W) + op(x, W' - W)`` with ``W' = W + scale * up @ down`` rebuilt on
  every call (this package's ``two_branch``).
- ``lycoris_locon:bypass``: the same module with ``bypass_mode=True``: ``op(x, W) + scale *
  up(down(x))``. LyCORIS itself falls back to the rebuild for a grouped convolution; the row's
  strategy column then says ``two_branch``.

All three: rank LORA_RANK, alpha LORA_BASELINE_ALPHA (scaling 2), no dropout, base frozen, every
adapter tensor randomised as for every provider. Their oracle is the base op plus one op with the
kernel ``LORA_BASELINE_SCALING * up @ down`` built from the module's tensors by
:func:`bench.suite.lora_oracle`, with the scaling the benchmark asked for (not the module's own).

A provider whose package is not installed is not listed (:func:`missing` says which and how to
install them). Nothing is imported before a provider is set up.
"""
from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import warnings

from torch import nn

from bench import suite

EXTRA = "compare"  # pyproject.toml's optional dependencies that install both packages
PACKAGES = {"peft_lora": "peft", "lycoris_locon": "lycoris", "lycoris_locon:bypass": "lycoris"}
DISTRIBUTIONS = {"peft": "peft", "lycoris": "lycoris-lora"}  # import name -> what pip installs
DESCRIPTIONS = {"peft_lora": "LoRA", "lycoris_locon": "LoCon (rebuild)", "lycoris_locon:bypass": "LoCon (bypass)"}


class _Holder(nn.Module):
    """A one-layer model for PEFT's injection, which targets modules by name."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer


def setup_peft_lora(shape: suite.Shape, ctx: suite.Context) -> suite.Prepared:
    """PEFT's LoRA layer around the frozen base layer; A and B randomised."""
    from peft import LoraConfig, inject_adapter_in_model

    base = suite.freeze(suite.base_module(shape, ctx))
    config = LoraConfig(r=suite.LORA_RANK, lora_alpha=suite.LORA_BASELINE_ALPHA, lora_dropout=0.0,
                        target_modules=["layer"])
    try:
        with suite.seeded(ctx.seed + 3), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "LoRA adapter added to ConvNd layer with groups > 1")  # then refused
            layer = inject_adapter_in_model(config, _Holder(base)).layer
    except ValueError as exc:  # PEFT's own refusal (a grouped conv whose groups do not divide the rank)
        raise suite.ProviderUnavailable(f"PEFT refuses this layer: {exc}") from exc
    down, up = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    oracle = suite.lora_oracle(shape, base, down, up, suite.LORA_BASELINE_SCALING)
    return suite.Prepared(layer, suite.perturb([down, up], ctx), oracle, "base op + merged LoRA kernel",
                          strategy_of=lambda x: "bypass")


def setup_lycoris_locon(shape: suite.Shape, ctx: suite.Context, bypass: bool) -> suite.Prepared:
    """LyCORIS's LoCon module around the frozen base layer (``bypass_mode=bypass``); up and down randomised."""
    from lycoris.modules.locon import LoConModule

    base = suite.freeze(suite.base_module(shape, ctx))
    with suite.seeded(ctx.seed + 3):
        module = LoConModule("bench", base, multiplier=1.0, lora_dim=suite.LORA_RANK,
                             alpha=suite.LORA_BASELINE_ALPHA, bypass_mode=bypass)
    module.to(ctx.device, ctx.dtype)
    down, up = module.lora_down.weight, module.lora_up.weight
    oracle = suite.lora_oracle(shape, base, down, up, suite.LORA_BASELINE_SCALING)
    strategy = "bypass" if module.bypass_mode else "two_branch"
    return suite.Prepared(module, suite.perturb([down, up], ctx), oracle, "base op + merged LoRA kernel",
                          strategy_of=lambda x: strategy)


SETUPS = {
    "peft_lora": setup_peft_lora,
    "lycoris_locon": functools.partial(setup_lycoris_locon, bypass=False),
    "lycoris_locon:bypass": functools.partial(setup_lycoris_locon, bypass=True),
}


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def providers() -> dict:
    """Provider name -> setup function, for the providers whose package is installed."""
    return {name: setup for name, setup in SETUPS.items() if _installed(PACKAGES[name])}


def import_packages(selected) -> None:
    """Imports the packages of the selected providers of this module (peft takes seconds: once,
    before anything is measured)."""
    for package in sorted({PACKAGES[name] for name in selected if name in PACKAGES}):
        importlib.import_module(package)


def describe(name: str) -> tuple:
    """``(what it is, package and version)`` of one of this module's providers."""
    distribution = DISTRIBUTIONS[PACKAGES[name]]
    try:
        version = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        version = "not installed"
    return DESCRIPTIONS[name], f"{distribution} {version}"


def missing() -> list:
    """The distributions of the providers that are not installed (pip names)."""
    return sorted({DISTRIBUTIONS[p] for p in PACKAGES.values() if not _installed(p)})
