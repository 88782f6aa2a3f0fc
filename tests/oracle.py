"""An independent float64 oracle, written from the formulas (not from the package's code).

dW for Tucker: dW[i_1..i_N] = sum_a G[a_1..a_N] prod_n U_n[i_n, a_n]  (one einsum)
FLoRA   W' = W + s dW            LieRA  W' = W exp(s dW) | W (1 + s dW), dW = (B A).reshape | Tucker
LoRA    W' = W + s (B A).reshape
SSL     W' = W d_in              SSB    W' = d_out W d_in
"""
from __future__ import annotations

import copy
import string

import torch
from torch import nn

import lrtensor_kernels as lk

F64 = torch.float64


def tucker64(core, factors):
    n = core.dim()
    letters = string.ascii_lowercase
    rank_idx, dim_idx = letters[:n], letters[n:2 * n]
    spec = rank_idx + "," + ",".join(d + r for d, r in zip(dim_idx, rank_idx)) + "->" + dim_idx
    return torch.einsum(spec, core.to(F64), *[u.to(F64) for u in factors])


def effective_weight64(layer, base=None) -> torch.Tensor:
    """W' in float64 from a layer's parameters (``base`` overrides the base weight)."""
    w = (layer.weight if base is None else base).detach().to(F64)
    if isinstance(layer, lk.layers.FLoRAMixin):
        return w + layer.scale * tucker64(layer.core, list(layer.factors))
    if isinstance(layer, lk.layers.LoRAMixin):
        return w + layer.scale * (layer.lora_B.to(F64) @ layer.lora_A.to(F64)).reshape(w.shape)
    if isinstance(layer, lk.layers.LieRAMixin):
        if layer.delta == "tucker":
            d = tucker64(layer.core, list(layer.factors))
        else:
            d = (layer.lora_B.to(F64) @ layer.lora_A.to(F64)).reshape(w.shape)
        e = layer.scale * d
        return w * torch.exp(e) if layer.mode == "exp" else w * (1 + e)
    if isinstance(layer, (lk.layers.SSLMixin, lk.layers.SSBMixin)):
        shape_in = (1, -1) + (1,) * (w.dim() - 2)
        out = w * layer.in_scale.to(F64).reshape(shape_in)
        if isinstance(layer, lk.layers.SSBMixin):
            out = out * layer.out_scale.to(F64).reshape((-1,) + (1,) * (w.dim() - 1))
        return out
    raise TypeError(type(layer))


def plain_twin(layer, weight, dtype=F64) -> nn.Module:
    """A plain nn layer with ``layer``'s geometry holding ``weight`` and the layer's bias."""
    base = layer._nn_base()
    twin = base(**layer._base_kwargs(layer), dtype=dtype, device=weight.device)
    with torch.no_grad():
        twin.weight.copy_(weight)
        if layer.bias is not None:
            twin.bias.copy_(layer.bias)
    return twin


def forward64(layer, x) -> torch.Tensor:
    """The layer's output in float64 through plain nn (its own padding logic)."""
    return plain_twin(layer, effective_weight64(layer))(x.to(F64))


def randomize_adapter(layer, seed: int, std: float = 0.3):
    """Random adapter tensors (a zero core hides every bug); scales near one for SSL/SSB."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.adapter_parameters():
            r = torch.randn(p.shape, generator=g, dtype=F64) * std
            if isinstance(layer, lk.layers.ScalingMixin):
                r = 1 + r
            p.copy_(r.to(p.dtype))
    return layer


def rel_err(got, ref, what: str = "result") -> float:
    """``||got - ref|| / ||ref||`` in float64, on ``got``'s device (a CUDA result against a CPU reference)."""
    got, ref = got.detach().to(F64), ref.detach().to(device=got.device, dtype=F64)
    assert torch.isfinite(got).all(), f"non-finite values in the {what}"
    return ((got - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def assert_accuracy(what, got, plain, ref, floor, magnitude=None):
    """The accuracy rule: err(got) <= 2 * err(plain PyTorch, same dtype) + floor, both vs float64.

    ``magnitude``: the same float64 computation on the absolute values of its inputs. Rounding
    error scales with the size of the summands, not of a result that cancels, so the floor is
    multiplied by the condition number ||magnitude|| / ||ref|| (1 where nothing cancels).
    """
    e_got, e_plain = rel_err(got, ref, f"{what} result"), rel_err(plain, ref, f"{what} plain PyTorch result")
    if magnitude is not None:
        floor *= max(1.0, magnitude.norm().item() / max(ref.detach().to(F64).norm().item(), 1e-300))
    assert e_got <= 2 * e_plain + floor, f"{what}: error {e_got:.3e} > 2 x plain {e_plain:.3e} + {floor:.1e}"


def clone_layer(layer):
    return copy.deepcopy(layer)


def layer_oracle(layer, x, grad_out, absolute=False):
    """Float64 output and gradients (input, then each adapter tensor). ``absolute``: the same from
    the absolute values of every input, the magnitude that rounding errors scale with (see
    oracle.assert_accuracy)."""
    value = (lambda t: t.detach().to(F64).abs()) if absolute else (lambda t: t.detach().to(F64))
    leaves = {n: value(p).requires_grad_() for n, p in layer.adapter_state().items()}
    twin = plain_twin(layer, value(layer.weight))
    if absolute and twin.bias is not None:
        twin.bias.data.abs_()
    x = value(x).requires_grad_()
    y = torch.func.functional_call(twin, {"weight": _weight64(layer, leaves)}, (x,))
    grads = torch.autograd.grad((y * value(grad_out)).sum(), [x, *leaves.values()])
    return y.detach(), list(grads)


def project64(layer, grad_weight) -> list:
    """The float64 gradient of every adapter tensor (``adapter_state`` order) given the gradient
    ``grad_weight`` of the loss w.r.t. the layer's effective weight W'."""
    leaves = {n: p.detach().to(F64).requires_grad_() for n, p in layer.adapter_state().items()}
    return list(torch.autograd.grad(_weight64(layer, leaves), list(leaves.values()), grad_weight.to(F64)))


def _weight64(layer, leaves):
    """effective_weight64 with the adapter tensors replaced by float64 leaves."""
    params = dict(layer.named_parameters())
    try:
        for n, leaf in leaves.items():
            _swap(layer, n, leaf)
        return effective_weight64(layer)
    finally:
        for n in leaves:
            _swap(layer, n, params[n])


def _swap(layer, dotted, value):
    owner_name, _, attr = dotted.rpartition(".")
    owner = layer.get_submodule(owner_name) if owner_name else layer
    owner._parameters[attr] = value
