"""Import LyCORIS / kohya LoCon adapters (what diffusion fine-tuners train on convolutions).

Key layout (lycoris-lora's ``LoConModule``, the one kohya's LoRA networks use too): the module at
dotted path ``p`` of a model is the LoRA name ``<prefix>_<p with every "." replaced by "_">``, and
its tensors are

- ``<name>.lora_down.weight``: (r, in) for a Linear; for a convolution (r, C_in/groups, *k) (plain
  LoCon) or (r, C_in/groups, 1, ...) (Tucker LoCon, ``use_tucker=True``);
- ``<name>.lora_up.weight``: (out, r) for a Linear, (C_out, r, 1, ...) for a convolution;
- ``<name>.lora_mid.weight``: (r, r, *k), Tucker LoCon only;
- ``<name>.alpha``: a scalar; the scale is ``alpha / r`` (alpha absent or 0: alpha = r).

Plain LoCon: ``dW = (up @ down).reshape(W.shape)``, which is LoRA: it loads into ``"lora"``
layers with ``lora_B = up`` (out, r), ``lora_A = down`` (r, C_in/groups * prod(k)), ``rank = r``.
Tucker LoCon: ``dW[o, i, k] = sum_{a,b} mid[a, b, k] up[o, a] down[b, i]``, which is FLoRA with
identity kernel factors: it loads into ``"flora"`` layers with ``core = mid``, factors ``(up,
down^T, I_k1, ..., I_kn)``, ranks ``(r, r, k_1, ..., k_n)``, ``scale = alpha / r`` (a rank above a
channel count is folded into the core, exactly, as FLoRA clips ranks). On a 1x1 convolution
lycoris stores no mid even with ``use_tucker``: plain LoCon.

Prefixes: ``"lycoris"`` (lycoris's own networks), ``"lora_unet"``, ``"lora_te"``, ``"lora_te1"``,
``"lora_te2"`` (kohya's: the UNet, the text encoders). A state dict for several models (a UNet and
its text encoder) is loaded one model at a time with ``prefix=``; keys of other prefixes are then
ignored. ``multiplier`` is lycoris's network multiplier (the strength), folded into the scale.
Refused, with the layer named: DoRA (``dora_scale``) and every other LyCORIS algorithm (LoHa's
``hada_*``, LoKr's ``lokr_*``...), and a grouped convolution whose ``lora_down`` has all C_in
input channels (lycoris before its grouped-convolution fix built such adapters, whose update is not
a weight of the layer's shape). Everything is checked before the model changes.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import nn

from . import validation
from .errors import AdapterConfigError
from .official import _install, _module, fold_oversized_factors
from .surgery import build_adapter

PREFIXES = ("lycoris", "lora_unet", "lora_te", "lora_te1", "lora_te2", "lora_te3")
LOCON_KEYS = ("lora_up.weight", "lora_down.weight", "lora_mid.weight", "alpha")
ADAPTABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def lora_name(prefix: str, path: str) -> str:
    """The LyCORIS / kohya name of the module at dotted ``path``."""
    return f"{prefix}_{path.replace('.', '_')}"


def _known_prefix(name: str) -> Optional[str]:
    for prefix in sorted(PREFIXES, key=len, reverse=True):
        if name.startswith(prefix + "_"):
            return prefix
    return None


def _grouped(state_dict: Mapping, prefix: Optional[str], what: str) -> tuple:
    """``(prefix, {lora name: {key after the name: tensor}})`` for the names under ``prefix`` (found
    from the keys when None)."""
    groups = {}
    for key, value in state_dict.items():
        name, dot, rest = key.partition(".")
        if dot:
            groups.setdefault(name, {})[rest] = value
    if prefix is None:
        found = {_known_prefix(n) for n in groups}
        if None in found:
            unknown = sorted(n for n in groups if _known_prefix(n) is None)[:3]
            raise AdapterConfigError(
                f"{what}: LoRA names {unknown} have none of the prefixes {list(PREFIXES)}; pass prefix=")
        if len(found) != 1:
            raise AdapterConfigError(
                f"{what}: the state dict holds adapters for several models (prefixes {sorted(found)}); load them "
                "one model at a time with prefix= (kohya: 'lora_unet' for the UNet, 'lora_te' or 'lora_te1'/"
                "'lora_te2' for the text encoders)" if found else f"{what}: no adapter tensor in the state dict "
                "(expected keys like 'lora_unet_<module>.lora_down.weight')")
        prefix = found.pop()
    groups = {n: t for n, t in groups.items() if n.startswith(prefix + "_")}
    if not groups:
        raise AdapterConfigError(f"{what}: no key of the state dict starts with {prefix + '_'!r}")
    return prefix, groups


def _paths_by_lora_name(model: nn.Module, prefix: str) -> dict:
    """``{lora name: [module paths]}`` for every module of ``model`` (two paths may mangle alike)."""
    paths = {}
    for path, _ in model.named_modules():
        if path:
            paths.setdefault(lora_name(prefix, path), []).append(path)
    return paths


def _scalar(value) -> Optional[float]:
    """A one-element real tensor's value (lycoris stores alpha so), else None."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex() and value.dtype != torch.bool:
        return float(value.item())
    return None


def _shape_problem(module: nn.Module, down, up, mid) -> Optional[str]:
    """What is wrong with the LoCon tensor shapes for ``module``, or None."""
    r = down.shape[0]
    weight = module.weight.shape
    kernel = tuple(weight[2:])
    ones = (1,) * len(kernel)
    expect_up = (weight[0], r) + ones
    if isinstance(module, nn.Linear):
        expect_down = (r, weight[1])
        if mid is not None:
            return "lora_mid.weight given for a Linear (Tucker LoCon applies to convolutions)"
    else:
        expect_down = (r, weight[1]) + (ones if mid is not None else kernel)
        if mid is not None and tuple(mid.shape) != (r, r) + kernel:
            return f"lora_mid.weight {list(mid.shape)}, expected {[r, r, *kernel]}"
        if module.groups > 1 and down.dim() >= 2 and down.shape[1] == module.in_channels:
            return (f"lora_down.weight {list(down.shape)} has all {module.in_channels} input channels of a conv with "
                    f"groups={module.groups}: an update of such an adapter is not a weight of the layer's shape "
                    f"{list(weight)} (lycoris before its grouped-convolution fix); expected {list(expect_down)}")
    if tuple(down.shape) != expect_down or tuple(up.shape) != expect_up:
        return (f"lora_down.weight {list(down.shape)} and lora_up.weight {list(up.shape)} do not fit the weight "
                f"{list(weight)}: expected {list(expect_down)} and {list(expect_up)}")
    return None


def load_locon(model: nn.Module, state_dict: Mapping, prefix: Optional[str] = None, multiplier: float = 1.0,
               dropout: float = 0.0) -> list:
    """LyCORIS / kohya LoCon adapters (plain and Tucker) from ``state_dict`` into ``model``: "lora"
    layers for plain LoCon, "flora" layers for Tucker LoCon, injected in place of the Conv1d/2d/3d
    and Linear modules they name (see the module doc for the key layout and the mapping).

    prefix: the LoRA name prefix of this model's keys (found from the keys when they have one
    known prefix). multiplier: the network strength, a factor on every scale. Base weights and
    other keys are ignored; every layer is checked before the model changes. Returns the adapted
    module paths."""
    what = "load_locon"
    multiplier = validation.real_number(multiplier, "multiplier", what)
    prefix, groups = _grouped(state_dict, prefix, what)
    paths = _paths_by_lora_name(model, prefix)
    problems, built, flags = [], {}, [(p, p.requires_grad) for p in model.parameters()]
    for name, tensors in groups.items():
        candidates = paths.get(name, [])
        if len(candidates) != 1:
            problems.append(f"'{name}': " + (f"no module of {type(model).__name__} is named so (module paths map to "
                                             f"'{prefix}_' + the path with '.' replaced by '_')" if not candidates
                                             else f"the paths {candidates} both map to it"))
            continue
        path = candidates[0]
        foreign = sorted(set(tensors) - set(LOCON_KEYS))
        if foreign:
            problems.append(f"layer '{path}': keys {foreign} are not LoCon's (LyCORIS's DoRA, LoHa, LoKr and other "
                            "algorithms are not supported)")
            continue
        if "lora_down.weight" not in tensors or "lora_up.weight" not in tensors:
            problems.append(f"layer '{path}': lora_down.weight and lora_up.weight are both needed, got "
                            f"{sorted(tensors)}")
            continue
        module = _module(model, path, problems, ADAPTABLE)
        if module is None:
            continue
        down, up, mid = tensors["lora_down.weight"], tensors["lora_up.weight"], tensors.get("lora_mid.weight")
        problem = _shape_problem(module, down, up, mid)
        bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
        alpha = _scalar(tensors["alpha"]) if "alpha" in tensors else 0.0
        if problem is None and bad:
            problem = f"{bad} hold non-finite values"
        if problem is None and alpha is None:
            problem = f"alpha must be a number (a one-element tensor), got {tensors['alpha']!r}"
        if problem:
            problems.append(f"layer '{path}': {problem}")
            continue
        rank = down.shape[0]
        alpha = alpha or float(rank)
        try:
            if mid is None:
                layer = build_adapter(module, "lora", path, rank=rank, alpha=multiplier * alpha, dropout=dropout)
                values = [up.reshape(up.shape[0], rank), down.reshape(rank, -1)]
            else:
                kernel = mid.shape[2:]
                eyes = [torch.eye(k, dtype=torch.float64) for k in kernel]
                core, factors = fold_oversized_factors(mid.to(torch.float64), [
                    up.reshape(up.shape[0], rank).to(torch.float64), down.reshape(rank, -1).t().to(torch.float64),
                    *eyes])
                layer = build_adapter(module, "flora", path, ranks=list(core.shape), scale=multiplier * alpha / rank,
                                      dropout=dropout)
                values = [core, *factors]
        except (TypeError, ValueError) as err:
            problems.append(f"layer '{path}': {err}")
            continue
        built[path] = (layer, values)
    return _install(model, built, what, problems, flags)
