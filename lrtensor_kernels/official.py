"""Import adapters trained with the papers' own code, so that their users switch without retraining.

FLoRA (the official ``FLoRALayer``): a wrapped layer ``<path>`` holds ``<path>.flora_layer.param_G``
of shape ``(r_in, r_out, r_k1, ...)`` and ``<path>.flora_layer.param_0`` (in, r_in), ``param_1``
(out, r_out), ``param_{2+n}`` (k_n, r_k_n); its delta is
``dW[o, i, k...] = sum G[p, q, s...] U_in[i, p] U_out[o, q] U_k[k, s]...`` and its output is
``layer(x) + scale * op(x, dW)``. Here modes are in PyTorch's weight order (out, in, k...), so the
core is ``G`` with its first two modes swapped and the factors are ``(param_1, param_0, param_2,
...)``. A rank above its mode size (the official code allows it, ours clips it) is folded into the
core: ``G x_n U_n`` with an identity factor, the same weights exactly.

LieRA (the official ``Linear``, first order): ``<path>.lora_A`` (r, in), ``<path>.lora_B`` (out,
r), output ``F.linear(x, W, b) + dropout(x) @ (W * (B @ A * alpha / r)).T``: here
``LieRALinear(mode="first_order", delta="lora")`` with the same tensors.

Neither state dict stores ``scale`` / ``alpha``: give them as trained. Keys that are not adapter
tensors (base weights, other layers) are ignored; the model keeps its own base weights. Paths are
those of ``model``; a ``"model."`` prefix (the official FLoRA wrapper's) is removed when the model
has no module of that name. Everything is checked before the model changes.
"""
from __future__ import annotations

import re
import warnings
from typing import Mapping, Optional

import torch
from torch import nn

from .adapter_layer import oversized_adapters_collected
from .errors import AdapterConfigError
from .surgery import adaptable_type, build_adapter, freeze_all_but_adapters, replace_module

_FLORA_KEY = re.compile(r"(.+)\.flora_layer\.param_(G|\d+)$")
_LIERA_KEY = re.compile(r"(.+)\.(lora_A|lora_B)$")


def _group(state_dict: Mapping, pattern: re.Pattern, prefix: Optional[str], model: nn.Module, what: str) -> dict:
    """``{module path in model: {tensor name: tensor}}`` for the keys ``pattern`` matches."""
    groups = {}
    for key, value in state_dict.items():
        match = pattern.fullmatch(key)
        if match:
            groups.setdefault(match.group(1), {})[match.group(2)] = value
    if not groups:
        raise ValueError(f"{what}: no adapter tensor in the state dict (expected keys like "
                         f"{'<layer>.flora_layer.param_G' if pattern is _FLORA_KEY else '<layer>.lora_A'})")
    names = {n for n, _ in model.named_modules()}
    if prefix is None:
        prefix = "model." if all(p.startswith("model.") for p in groups) and "model" not in names else ""
    return {path[len(prefix):] if path.startswith(prefix) else path: tensors for path, tensors in groups.items()}


def _install(model: nn.Module, built: dict, what: str, problems: list, flags: list) -> list:
    if problems:
        for p, flag in flags:  # building a layer may freeze the base weight it shares
            p.requires_grad_(flag)
        raise AdapterConfigError(f"{what}: the state dict does not match the model:\n  " + "\n  ".join(problems))
    for name, (layer, tensors) in built.items():
        with torch.no_grad():
            for param, value in zip(layer.adapter_tensors(), tensors):
                param.copy_(value)
        replace_module(model, name, layer)
    freeze_all_but_adapters(model)
    return list(built)


def _module(model: nn.Module, name: str, problems: list, kinds: tuple):
    modules = dict(model.named_modules())
    module = modules.get(name)
    if module is None:
        problems.append(f"layer '{name}': no such module in {type(model).__name__}")
        return None
    if adaptable_type(module) not in kinds:
        problems.append(f"layer '{name}': a {type(module).__name__} in the model; expected "
                        f"{' or '.join(k.__name__ for k in kinds)}")
        return None
    return module


def flora_from_official(core: torch.Tensor, params: list) -> tuple:
    """``(core, factors)`` in PyTorch's weight order from the official ``param_G`` and ``param_0..N-1``
    (see the module doc), ranks above their mode size folded into the core. Float64 math, so the
    fold adds no error beyond the final rounding to the parameters' dtype."""
    core = core.to(torch.float64).transpose(0, 1)
    return fold_oversized_factors(core, [p.to(torch.float64) for p in [params[1], params[0], *params[2:]]])


def fold_oversized_factors(core: torch.Tensor, factors: list) -> tuple:
    """``(core, factors)`` with every factor that has more columns than rows (a rank above its mode
    size, which FLoRA layers clip) folded into the core: ``core x_n U_n`` and an identity factor,
    the same Tucker product exactly up to rounding."""
    factors = list(factors)
    for mode, factor in enumerate(factors):
        size, rank = factor.shape
        if rank > size:
            core = torch.tensordot(factor, core, dims=([1], [mode])).movedim(0, mode)
            factors[mode] = torch.eye(size, dtype=factor.dtype, device=factor.device)
    return core, factors


def load_official_flora(model: nn.Module, state_dict: Mapping, scale: float, prefix: Optional[str] = None,
                        dropout: float = 0.0) -> list:
    """Adapters from the official FLoRA code's state dict into ``model`` (FLoRA layers injected in
    place of its Conv1d/2d/3d and Linear layers). ``scale``: the ``scale`` of the official
    ``flora_cfg``. Returns the adapted layer names. See the module doc for the mapping."""
    what = "load_official_flora"
    groups = _group(state_dict, _FLORA_KEY, prefix, model, what)
    problems, built, flags = [], {}, [(p, p.requires_grad) for p in model.parameters()]
    for name, tensors in groups.items():
        module = _module(model, name, problems, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))
        if module is None:
            continue
        order = module.weight.dim()
        expected = ["G"] + [str(i) for i in range(order)]
        if sorted(tensors) != sorted(expected):
            problems.append(f"layer '{name}': tensors {sorted(tensors)}, expected param_{{{', '.join(expected)}}} "
                            f"for a weight of order {order}")
            continue
        params = [tensors[str(i)] for i in range(order)]
        official_dims = [p.shape[0] for p in params]
        weight_dims = [module.weight.shape[1], module.weight.shape[0], *module.weight.shape[2:]]
        if official_dims != weight_dims or [p.shape[1] for p in params] != list(tensors["G"].shape):
            groups_note = (f" (a conv with groups={module.groups}: the official code has none)"
                           if getattr(module, "groups", 1) > 1 else "")
            problems.append(f"layer '{name}': param_G {list(tensors['G'].shape)} and factors "
                            f"{[list(p.shape) for p in params]} do not fit the weight "
                            f"{list(module.weight.shape)}, which needs factor rows {weight_dims} (in, out, k...)"
                            f"{groups_note}")
            continue
        core, factors = flora_from_official(tensors["G"], params)
        try:
            with oversized_adapters_collected():  # the sizes the adapters were trained at are not news
                layer = build_adapter(module, "flora", name, ranks=list(core.shape), scale=scale, dropout=dropout)
        except (TypeError, ValueError) as err:
            problems.append(f"layer '{name}': {err}")
            continue
        if getattr(module, "padding_mode", "zeros") != "zeros":
            warnings.warn(f"{what}: layer '{name}' has padding_mode={module.padding_mode!r}; the official adapter "
                          "branch zero-pads, this layer pads W' as a whole: outputs differ at the borders",
                          stacklevel=2)
        built[name] = (layer, [core, *factors])
    return _install(model, built, what, problems, flags)


def load_official_liera(model: nn.Module, state_dict: Mapping, alpha: float, prefix: Optional[str] = None,
                        dropout: float = 0.0) -> list:
    """Adapters from the official LieRA code's state dict (``lora_A``, ``lora_B`` of its Linear
    layers) into ``model`` as ``LieRALinear(mode="first_order", delta="lora")``. ``alpha``: the
    official ``lora_alpha`` (scale ``alpha / r``). Returns the adapted layer names."""
    what = "load_official_liera"
    groups = _group(state_dict, _LIERA_KEY, prefix, model, what)
    problems, built, flags = [], {}, [(p, p.requires_grad) for p in model.parameters()]
    for name, tensors in groups.items():
        module = _module(model, name, problems, (nn.Linear,))
        if module is None:
            continue
        if sorted(tensors) != ["lora_A", "lora_B"]:
            problems.append(f"layer '{name}': tensors {sorted(tensors)}, expected lora_A and lora_B")
            continue
        a, b = tensors["lora_A"], tensors["lora_B"]
        rank = a.shape[0]
        if list(a.shape) != [rank, module.in_features] or list(b.shape) != [module.out_features, rank]:
            problems.append(f"layer '{name}': lora_A {list(a.shape)} and lora_B {list(b.shape)} do not fit "
                            f"Linear({module.in_features}, {module.out_features}): expected "
                            f"[r, {module.in_features}] and [{module.out_features}, r]")
            continue
        try:
            with oversized_adapters_collected():
                layer = build_adapter(module, "liera", name, rank=rank, alpha=alpha, mode="first_order",
                                      delta="lora", dropout=dropout)
        except (TypeError, ValueError) as err:
            problems.append(f"layer '{name}': {err}")
            continue
        built[name] = (layer, [b, a])
    return _install(model, built, what, problems, flags)
