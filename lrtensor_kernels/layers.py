"""Adapter layers: drop-in subclasses of nn.Conv1d/2d/3d and nn.Linear, one mixin per method.

``FLoRA<Conv1d|Conv2d|Conv3d|Linear>``, ``LoRA...``, ``LieRA...``, ``SSL...``, ``SSB...``: the nn class's own
constructor signature plus the method's keywords; what they share is
:class:`lrtensor_kernels.adapter_layer.AdapterLayer`. ``LAYERS[method][nn class]`` is the class
that adapts a module of that nn class.
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch
from torch import nn

from . import methods, validation
from .adapter_layer import AdapterLayer
from .errors import AdapterConfigError


def tucker_ranks(layer: AdapterLayer, ranks: Union[int, Sequence[int], None], default: int) -> tuple:
    """Per-mode Tucker ranks: an int sets both channel modes (kernel modes get min(k, 2)), a
    sequence sets every mode; each is clipped to its mode size."""
    shape, owner = tuple(layer.weight.shape), layer._label()
    if ranks is None:
        ranks = default
    if not validation.is_sequence(ranks):
        r = validation.rank(ranks, "ranks", owner)
        ranks = (r, r) + tuple(min(k, 2) for k in shape[2:])
    else:
        given = ranks
        ranks = validation.rank_list(ranks, "ranks", owner)
        if len(ranks) != len(shape):
            raise layer._error(AdapterConfigError, f"ranks needs one entry per weight mode {shape} "
                               f"({len(shape)} entries), got {given!r}")
    return tuple(min(r, d) for r, d in zip(ranks, shape))


class TuckerDelta:
    """Tucker delta parameters: ``core`` (r_1..r_N) and ``factors`` (U_n of shape (d_n, r_n))."""

    def _create_tucker(self, device, ranks):
        dtype = methods.compute_dtype(self.weight.dtype)
        self.core = nn.Parameter(torch.zeros(ranks, device=device, dtype=dtype))
        factors = []
        for d, r in zip(self.weight.shape, ranks):
            u = torch.empty(d, r, device=device, dtype=dtype)
            if u.device.type != "meta":
                nn.init.kaiming_normal_(u, a=math.sqrt(3))
            factors.append(nn.Parameter(u))
        self.factors = nn.ParameterList(factors)

    def _tucker_tensors(self):
        return [self.core, *self.factors]


class FLoRAMixin(TuckerDelta, AdapterLayer):
    """FLoRA: ``W' = W + scale * (core x_1 U_1 ... x_N U_N)``.

    Defaults: conv ranks 16 for the channel modes and min(k, 2) for each kernel mode, scale 4.0
    (the FLoRA repository's convolution settings); linear ranks (8, 8), scale 2.0: the
    Subspace-Tuning repository's LLaMA scripts (alpha / r = 16 / 8), not the FLoRA repository's
    ``FLoRALayer`` default of 1.0. Core starts at zero, factors kaiming-normal (a = sqrt(3)).
    """

    adapter_method = "flora"
    adapter_param_names = ("core", "factors")
    adapter_math = methods.AdapterMath("tucker", "add")
    peft_keywords = {"r": "FLoRA's is ranks (an int sets both channel modes; or one entry per weight mode)",
                     "lora_alpha": "FLoRA's is scale, the update's multiplier itself (PEFT's lora_alpha / r)"}

    def __init__(self, *args, ranks=None, scale=None, dropout: float = 0.0, strategy: str = "auto", **kwargs):
        self._check_keywords(kwargs)
        super().__init__(*args, **kwargs)
        self._init_adapter(kwargs.get("device"), dropout, strategy, ranks=ranks, scale=scale)

    def _configure(self, ranks, scale):
        linear = self._is_linear()
        self.ranks = tucker_ranks(self, ranks, 8 if linear else 16)
        self.scale = (2.0 if linear else 4.0) if scale is None else validation.real_number(scale, "scale", self._label())

    def _create_adapter(self, device):
        self._create_tucker(device, self.ranks)

    def adapter_tensors(self):
        return self._tucker_tensors()

    def adapter_config(self):
        return dict(ranks=list(self.ranks), scale=self.scale, dropout=self.dropout)


class LowRankDelta:
    """A LoRA-form delta ``dW = (lora_B @ lora_A).reshape(W.shape)``: ``lora_A`` (rank,
    prod(W.shape[1:])) kaiming-uniform (a = sqrt(5), as PEFT and the LoRA reference code),
    ``lora_B`` (out, rank) zero; ``scale = alpha / rank``. The rank is not clipped."""

    def _configure_rank(self, rank, alpha):
        owner = self._label()
        self.rank = validation.rank(rank, "rank", owner)
        self.alpha = validation.real_number(alpha, "alpha", owner)
        self.scale = self.alpha / self.rank

    def _create_lora(self, device):
        dtype = methods.compute_dtype(self.weight.dtype)
        a = torch.empty(self.rank, self.weight[0].numel(), device=device, dtype=dtype)
        if a.device.type != "meta":
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(torch.zeros(self.weight.shape[0], self.rank, device=device, dtype=dtype))

    def _lora_tensors(self):
        return [self.lora_B, self.lora_A]


class LoRAMixin(LowRankDelta, AdapterLayer):
    """LoRA: ``W' = W + scale * (lora_B @ lora_A).reshape(W.shape)``, ``scale = alpha / rank``.

    As PEFT's LoRA: on a convolution ``lora_A`` (rank, C_in/groups * prod(k)) is a kernel of the
    layer's own geometry down to ``rank`` channels and ``lora_B`` (C_out, rank) a 1x1 projection
    back (PEFT builds ``lora_A`` with all C_in input channels, which a grouped weight does not
    have: here each group's inputs are seen through the same ``lora_A``, so that ``dW`` has the
    weight's shape and merges). Defaults as PEFT's ``LoraConfig``: rank 8, alpha 8, dropout 0,
    ``lora_B`` zero, ``lora_A`` kaiming-uniform (a = sqrt(5)).
    """

    adapter_method = "lora"
    adapter_param_names = ("lora_A", "lora_B")
    adapter_math = methods.AdapterMath("lora", "add")
    peft_keywords = {"r": "LoRA's is rank", "lora_alpha": "LoRA's is alpha (scale = alpha / rank, as PEFT's "
                                                          "lora_alpha / r)"}

    def __init__(self, *args, rank: int = 8, alpha: float = 8.0, dropout: float = 0.0, strategy: str = "auto",
                 **kwargs):
        self._check_keywords(kwargs)
        super().__init__(*args, **kwargs)
        self._init_adapter(kwargs.get("device"), dropout, strategy, rank=rank, alpha=alpha)

    def _configure(self, rank, alpha):
        self._configure_rank(rank, alpha)

    def _create_adapter(self, device):
        self._create_lora(device)

    def adapter_tensors(self):
        return self._lora_tensors()

    def adapter_config(self):
        return dict(rank=self.rank, alpha=self.alpha, dropout=self.dropout)


LIERA_MODES = ("exp", "first_order")  # each is also the combine rule of methods.py
LIERA_DELTAS = ("lora", "tucker")


class LieRAMixin(TuckerDelta, LowRankDelta, AdapterLayer):
    """LieRA: ``W' = W * exp(scale * dW)`` (mode "exp") or ``W * (1 + scale * dW)`` ("first_order").

    ``dW = (lora_B @ lora_A).reshape(W.shape)`` (delta "lora": ``lora_A`` (rank, prod(W.shape[1:]))
    kaiming-uniform, ``lora_B`` (out, rank) zero) or a Tucker product (delta "tucker": ranks
    (rank, rank, min(k, 2)...), clipped to the mode sizes). ``scale = alpha / rank``.
    """

    adapter_method = "liera"
    peft_keywords = {"r": "LieRA's is rank", "lora_alpha": "LieRA's is alpha (scale = alpha / rank, as PEFT's "
                                                            "lora_alpha / r)"}

    def __init__(self, *args, rank: int = 8, alpha: float = 8.0, mode: str = "exp", delta: str = "lora",
                 dropout: float = 0.0, strategy: str = "auto", **kwargs):
        self._check_keywords(kwargs)
        super().__init__(*args, **kwargs)
        self._init_adapter(kwargs.get("device"), dropout, strategy, rank=rank, alpha=alpha, mode=mode, delta=delta)

    def _configure(self, rank, alpha, mode, delta):
        owner = self._label()
        self.mode = validation.choice(mode, "mode", LIERA_MODES, owner)
        self.delta = validation.choice(delta, "delta", LIERA_DELTAS, owner)
        self._configure_rank(rank, alpha)
        self.adapter_math = methods.AdapterMath(delta, mode)
        if delta == "tucker":
            self.ranks = tucker_ranks(self, rank, rank)
            self.adapter_param_names = ("core", "factors")
        else:
            self.adapter_param_names = ("lora_A", "lora_B")

    def _create_adapter(self, device):
        if self.delta == "tucker":
            self._create_tucker(device, self.ranks)
        else:
            self._create_lora(device)

    def adapter_tensors(self):
        return self._tucker_tensors() if self.delta == "tucker" else self._lora_tensors()

    def adapter_config(self):
        return dict(rank=self.rank, alpha=self.alpha, mode=self.mode, delta=self.delta, dropout=self.dropout)


class ScalingMixin(AdapterLayer):
    """SSL ``W' = W * d_in`` and SSB ``W' = d_out * W * d_in``: learned scales of the weight's
    input channels (``in_scale``, shape (W.shape[1],)) and output channels (``out_scale``,
    shape (W.shape[0],)), broadcast over the other modes; both start at one."""

    adapter_math = methods.AdapterMath("scales", "mul")
    scale = 1.0
    scales_outputs = False
    peft_keywords = {"r": "the scalings have no rank", "lora_alpha": "the scalings have no scale"}

    def __init__(self, *args, dropout: float = 0.0, strategy: str = "auto", **kwargs):
        self._check_keywords(kwargs)
        super().__init__(*args, **kwargs)
        self._init_adapter(kwargs.get("device"), dropout, strategy)

    def _configure(self):
        pass

    def _create_adapter(self, device):
        dtype = methods.compute_dtype(self.weight.dtype)
        self.in_scale = nn.Parameter(torch.ones(self.weight.shape[1], device=device, dtype=dtype))
        if self.scales_outputs:
            self.out_scale = nn.Parameter(torch.ones(self.weight.shape[0], device=device, dtype=dtype))

    def adapter_tensors(self):
        return [self.in_scale, self.out_scale] if self.scales_outputs else [self.in_scale]

    def adapter_config(self):
        return dict(dropout=self.dropout)


class SSLMixin(ScalingMixin):
    adapter_method = "ssl"
    adapter_param_names = ("in_scale",)


class SSBMixin(ScalingMixin):
    adapter_method = "ssb"
    adapter_param_names = ("in_scale", "out_scale")
    scales_outputs = True


class FLoRAConv1d(FLoRAMixin, nn.Conv1d):
    """nn.Conv1d with a FLoRA adapter (see FLoRAMixin)."""


class FLoRAConv2d(FLoRAMixin, nn.Conv2d):
    """nn.Conv2d with a FLoRA adapter (see FLoRAMixin)."""


class FLoRAConv3d(FLoRAMixin, nn.Conv3d):
    """nn.Conv3d with a FLoRA adapter (see FLoRAMixin)."""


class FLoRALinear(FLoRAMixin, nn.Linear):
    """nn.Linear with a FLoRA adapter (see FLoRAMixin)."""


class LoRAConv1d(LoRAMixin, nn.Conv1d):
    """nn.Conv1d with a LoRA adapter (see LoRAMixin)."""


class LoRAConv2d(LoRAMixin, nn.Conv2d):
    """nn.Conv2d with a LoRA adapter (see LoRAMixin)."""


class LoRAConv3d(LoRAMixin, nn.Conv3d):
    """nn.Conv3d with a LoRA adapter (see LoRAMixin)."""


class LoRALinear(LoRAMixin, nn.Linear):
    """nn.Linear with a LoRA adapter (see LoRAMixin)."""


class LieRAConv1d(LieRAMixin, nn.Conv1d):
    """nn.Conv1d with a LieRA adapter (see LieRAMixin)."""


class LieRAConv2d(LieRAMixin, nn.Conv2d):
    """nn.Conv2d with a LieRA adapter (see LieRAMixin)."""


class LieRAConv3d(LieRAMixin, nn.Conv3d):
    """nn.Conv3d with a LieRA adapter (see LieRAMixin)."""


class LieRALinear(LieRAMixin, nn.Linear):
    """nn.Linear with a LieRA adapter (see LieRAMixin)."""


class SSLConv1d(SSLMixin, nn.Conv1d):
    """nn.Conv1d with SSL input-channel scales (see ScalingMixin)."""


class SSLConv2d(SSLMixin, nn.Conv2d):
    """nn.Conv2d with SSL input-channel scales (see ScalingMixin)."""


class SSLConv3d(SSLMixin, nn.Conv3d):
    """nn.Conv3d with SSL input-channel scales (see ScalingMixin)."""


class SSLLinear(SSLMixin, nn.Linear):
    """nn.Linear with SSL input-feature scales (see ScalingMixin)."""


class SSBConv1d(SSBMixin, nn.Conv1d):
    """nn.Conv1d with SSB input- and output-channel scales (see ScalingMixin)."""


class SSBConv2d(SSBMixin, nn.Conv2d):
    """nn.Conv2d with SSB input- and output-channel scales (see ScalingMixin)."""


class SSBConv3d(SSBMixin, nn.Conv3d):
    """nn.Conv3d with SSB input- and output-channel scales (see ScalingMixin)."""


class SSBLinear(SSBMixin, nn.Linear):
    """nn.Linear with SSB input- and output-feature scales (see ScalingMixin)."""


LAYERS = {
    "flora": {nn.Conv1d: FLoRAConv1d, nn.Conv2d: FLoRAConv2d, nn.Conv3d: FLoRAConv3d, nn.Linear: FLoRALinear},
    "lora": {nn.Conv1d: LoRAConv1d, nn.Conv2d: LoRAConv2d, nn.Conv3d: LoRAConv3d, nn.Linear: LoRALinear},
    "liera": {nn.Conv1d: LieRAConv1d, nn.Conv2d: LieRAConv2d, nn.Conv3d: LieRAConv3d, nn.Linear: LieRALinear},
    "ssl": {nn.Conv1d: SSLConv1d, nn.Conv2d: SSLConv2d, nn.Conv3d: SSLConv3d, nn.Linear: SSLLinear},
    "ssb": {nn.Conv1d: SSBConv1d, nn.Conv2d: SSBConv2d, nn.Conv3d: SSBConv3d, nn.Linear: SSBLinear},
}
