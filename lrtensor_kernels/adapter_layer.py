"""What every adapter layer shares (:class:`AdapterLayer`): construction around a frozen base,
the strategy setting, input checks, forward dispatch, merge/unmerge and the merged state in the
state dict. The methods' layers are in :mod:`lrtensor_kernels.layers`.

Each layer keeps the frozen base ``weight`` and ``bias`` of its nn class and adds the small
adapter tensors of one method. Its forward is ``op(x, W')`` with ``W' = combine(W, scale *
delta)`` as :mod:`lrtensor_kernels.methods` defines it; the strategy and the backend in force
decide how that is computed (:mod:`lrtensor_kernels.strategies`, :mod:`lrtensor_kernels.backend`),
the layer does not.

A layer may hold several named adapters of its method, one of them active
(:mod:`lrtensor_kernels.held_adapters`).
"""
from __future__ import annotations

import contextlib
import contextvars
import inspect
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import methods, ops, strategies, suggestions, validation
from .errors import AdapterConfigError, AdapterInputError, AdapterTypeError, OversizedAdapterWarning
from .held_adapters import DEFAULT_ADAPTER, HeldAdapters, StoredAdapter  # noqa: F401 (re-exported)

AdaptableBase = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
# the state dict key of a merged layer's base weight (its ``weight`` key then holds W')
BASE_WEIGHT_KEY = "base_weight"
# PEFT's LoRA keywords every layer answers the same way (a method adds its own: ``peft_keywords``)
PEFT_KEYWORDS = {
    "lora_dropout": "here: dropout",
    "modules_to_save": "here: inject(..., trainable_modules=...)",
    "bias": "no equivalent here: base biases stay frozen (set requires_grad on them, or name their modules in "
            "trainable_modules)",
    "use_rslora": "no equivalent here (the scale is set directly)",
    "use_dora": "no equivalent here",
    "init_lora_weights": "no equivalent here (adapters start at W' = W)",
    "fan_in_fan_out": "no equivalent here (weights are read in PyTorch's layout)",
}
# where oversized adapters are reported: None, warn at once; a list, collect (inject warns once for all)
_oversized = contextvars.ContextVar("lrtensor_oversized_adapters", default=None)


@contextlib.contextmanager
def oversized_adapters_collected():
    """Within the block, layers whose adapters outsize their weights are collected, not warned of
    one by one: the block yields the list of ``(layer, adapter numbers, weight numbers)``."""
    found = []
    token = _oversized.set(found)
    try:
        yield found
    finally:
        _oversized.reset(token)


def oversized_description(layer, adapter: int, weight: int) -> str:
    config = ", ".join(f"{k}={v}" for k, v in layer.adapter_config().items() if k in ("rank", "ranks"))
    return f"{layer._label()} ({config or 'no rank'}): {adapter} adapter numbers for {weight} weights"


class GradInParameterLayout(torch.autograd.Function):
    """Identity on tensors whose gradients come back with exactly the strides of the tensors
    themselves.

    Backends return adapter gradients in whatever layout their last op leaves, e.g. a stride of
    256 on a size-1 mode of a 1x1 conv's FLoRA core. Autograd accepts such a gradient (strides of
    size-1 modes do not count for its layout check), DDP does not: its bucket views have the
    parameter's exact strides and it warns on every step. A copy of these small tensors, made
    only where the strides differ, fixes that for every backend at once. Only tensors with a size-1
    mode need it (``AdapterLayer._adapter_inputs``).
    """

    generate_vmap_rule = True  # torch.func transforms (per-sample gradients) work through it

    @staticmethod
    def forward(*tensors):
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.layouts = [(t.shape, t.stride()) for t in inputs]

    @staticmethod
    def backward(ctx, *grads):
        # lists, not generators: torch.compile (2.14) fails a fullgraph trace that leaves a generator
        # made in an autograd.Function's backward for it to close
        grads = [ops.in_layout(g, shape, stride) for g, (shape, stride) in zip(grads, ctx.layouts)]
        if torch.compiler.is_compiling():
            # inductor counts the strides of size-1 modes as free: it drops the copy above where
            # only those differ and returns the gradient in its producer's layout. A contiguous
            # clone it lays out with the contiguous strides, size-1 modes included.
            grads = [g.clone(memory_format=torch.contiguous_format) if g is not None and stride == _contiguous(shape)
                     else g for g, (shape, stride) in zip(grads, ctx.layouts)]
        return tuple(grads)


def _contiguous(shape) -> tuple:
    """The strides of a contiguous tensor of ``shape``."""
    strides, size = [], 1
    for n in reversed(shape):
        strides.append(size)
        size *= n
    return tuple(reversed(strides))


class AdapterLayer(HeldAdapters, nn.Module):
    """What every adapter layer shares: forward dispatch, input checks, merge/unmerge, naming.

    ``weight`` and ``bias`` are frozen (``requires_grad=False``) however the layer is built; a user
    may re-enable them and gets correct gradients. ``strategy`` names how the forward and backward
    are computed (:mod:`lrtensor_kernels.strategies`; checked on assignment); it never changes
    the result. Adapter tensors stay float32 (float64 beside a float64 weight) through
    ``.half()``, ``.bfloat16()`` and ``.to(dtype)``. The state dict of a merged layer holds ``W'``
    under ``weight`` and the base weight under ``base_weight``; loading a state dict sets the
    merged state it describes. Subclasses set ``adapter_method`` and implement ``_configure``,
    ``_create_adapter(device)``, ``adapter_tensors()``, ``adapter_config()``, ``adapter_math``
    and ``scale``.
    """

    adapter_method: str = ""
    adapter_param_names: tuple = ()
    adapter_name: Optional[str] = None  # the layer's dotted name in its model (error messages)

    # -- construction ------------------------------------------------------------------
    peft_keywords: dict = {}  # PEFT's keyword -> this method's (see PEFT_KEYWORDS)

    @classmethod
    def _check_keywords(cls, kwargs: dict) -> None:
        """Refuses keywords that neither the nn class nor the method takes, naming this method's
        keyword for each of PEFT's LoRA keywords and the closest names for the others."""
        taken = set(inspect.signature(cls._nn_base().__init__).parameters) - {"self"}
        unknown = [k for k in kwargs if k not in taken]
        if not unknown:
            return
        own = [p.name for p in inspect.signature(cls.__init__).parameters.values()
               if p.kind == p.KEYWORD_ONLY]
        hints = []
        for key in unknown:
            ours = {**PEFT_KEYWORDS, **cls.peft_keywords}.get(key)
            if ours is not None:
                hints.append(f"unexpected keyword argument '{key}' (PEFT's name; {ours})")
            else:
                hints.append(f"unexpected keyword argument '{key}'"
                             + suggestions.closest_phrase(key, own + sorted(taken)))
        raise AdapterTypeError(f"{cls.__name__}: " + "; ".join(hints) + f". Its keywords: {', '.join(own)} and "
                               f"nn.{cls._nn_base().__name__}'s")

    def _init_adapter(self, device, dropout: float, strategy: str, **config):
        self.dropout = validation.probability(dropout, "dropout", self._label())
        self._merged_base: Optional[torch.Tensor] = None
        self.active_adapter = DEFAULT_ADAPTER
        self._held = [DEFAULT_ADAPTER]  # every adapter's name, in the order they were added
        self._configure(**config)
        self.strategy = strategy
        self._freeze_base()
        self._create_adapter("meta")  # its size first, allocating nothing
        self._report_if_oversized()
        if device is None or torch.device(device).type != "meta":
            self._create_adapter(device)

    def _report_if_oversized(self) -> None:
        """An adapter that trains more numbers than its weight holds (training the layer in full
        would train fewer) is reported: OversizedAdapterWarning, or collected (see
        :func:`oversized_adapters_collected`)."""
        adapter, weight = sum(p.numel() for p in self.adapter_parameters()), self.weight.numel()
        if adapter <= weight:
            return
        collected = _oversized.get()
        if collected is not None:
            collected.append((self, adapter, weight))
            return
        warnings.warn(f"{oversized_description(self, adapter, weight)}: the adapter trains more numbers than the "
                      "layer's weight holds; a lower rank, or training the layer in full, trains fewer",
                      OversizedAdapterWarning, stacklevel=4)

    def _freeze_base(self):
        for p in (self.weight, self.bias):
            if p is not None:
                p.requires_grad_(False)

    @property
    def strategy(self) -> str:
        return self._strategy

    @strategy.setter
    def strategy(self, value: str):
        try:
            self._strategy = strategies.check_strategy(value, self.adapter_math)
        except ValueError as err:
            raise self._error(AdapterConfigError, str(err)) from None

    def _apply(self, fn, *args, **kwargs):
        # a conversion to a 16-bit (or narrower) float leaves the adapter tensors (and their
        # gradients) in float32, converted once from the originals; inactive adapters' too
        stored = self._stored()
        params = self.adapter_parameters() + [p for a in stored.values() for p in a.parameters()]
        keep = {id(t) for p in params for t in (p, p.grad) if t is not None}

        def keep_adapters_wide(t):
            out = fn(t)
            if id(t) in keep and out.is_floating_point() and out.dtype not in (torch.float32, torch.float64):
                out = t.to(device=out.device, dtype=torch.float32)
            return out

        super()._apply(keep_adapters_wide, *args, **kwargs)
        if self._merged_base is not None:
            self._merged_base = fn(self._merged_base)
        return self

    @classmethod
    def _base_kwargs(cls, module: nn.Module) -> dict:
        if isinstance(module, nn.Linear):
            return dict(in_features=module.in_features, out_features=module.out_features,
                        bias=module.bias is not None)
        return dict(in_channels=module.in_channels, out_channels=module.out_channels,
                    kernel_size=module.kernel_size, stride=module.stride, padding=module.padding,
                    dilation=module.dilation, groups=module.groups, bias=module.bias is not None,
                    padding_mode=module.padding_mode)

    @classmethod
    def from_module(cls, module: nn.Module, **adapter_kwargs) -> "AdapterLayer":
        """An adapter layer around ``module``'s own weight and bias (shared, not copied; frozen)."""
        layer = cls.sized_for(module, **adapter_kwargs)
        layer.take_module(module)
        return layer

    @classmethod
    def sized_for(cls, module: nn.Module, **adapter_kwargs) -> "AdapterLayer":
        """The layer ``from_module`` builds, still on the meta device: its configuration checked and
        an adapter larger than the weight reported, nothing allocated (see :meth:`take_module`)."""
        base = cls._nn_base()
        if not isinstance(module, base) or isinstance(module, AdapterLayer):
            raise AdapterTypeError(f"{cls.__name__}.from_module expects a plain {base.__name__}, "
                                   f"got {type(module).__name__}")
        geometry = cls._base_kwargs(module)
        given = [k for k in adapter_kwargs if k in geometry or k in ("device", "dtype")]
        if given:
            peft = "; PEFT's bias='none'|'all'|'lora_only' has " + PEFT_KEYWORDS["bias"] if "bias" in given else ""
            raise AdapterTypeError(f"{cls.__name__}.from_module: {', '.join(repr(k) for k in given)} given, which "
                                   f"come from the module (its geometry, bias, device and dtype){peft}")
        return cls(**geometry, device="meta", dtype=module.weight.dtype, **adapter_kwargs)

    def take_module(self, module: nn.Module) -> None:
        """Holds ``module``'s weight and bias (shared, frozen) and creates the adapter tensors on
        their device; ``module`` is the one this layer was sized for."""
        self.weight = module.weight
        self.bias = module.bias
        self._freeze_base()
        self._create_adapter(module.weight.device)
        self.train(module.training)

    @classmethod
    def _nn_base(cls) -> type:
        return next(b for b in cls.__mro__ if b in AdaptableBase)

    # -- what a method provides ------------------------------------------------------------
    adapter_math: methods.AdapterMath

    def _configure(self, **config):
        raise NotImplementedError

    def _create_adapter(self, device):
        raise NotImplementedError

    def adapter_tensors(self) -> list:
        """The adapter tensors in the order of ``methods`` for this method's delta."""
        raise NotImplementedError

    def adapter_config(self) -> dict:
        """The keyword arguments that rebuild this adapter exactly (JSON-serialisable)."""
        raise NotImplementedError

    def adapter_state(self) -> dict:
        """The active adapter's tensors by name, as ``save_adapters`` writes them ({} when none is active)."""
        if self.active_adapter is None:
            return {}
        return {name: t for name, t in self.named_parameters() if name.split(".")[0] in self.adapter_param_names}

    def adapter_parameters(self):
        return [p for _, p in self.adapter_state().items()]

    def _adapter_inputs(self) -> list:
        """``adapter_tensors()`` as the forward hands them to a backend: the same values, with
        gradients that come back in each parameter's own layout (see ``GradInParameterLayout``);
        as they are under a torch.func transform or forward-mode AD, whose gradients are no
        parameter's ``.grad``. Tensors without a size-1 mode pass as plain views: autograd already
        gives their ``.grad`` exactly their strides (it copies a gradient whose strides differ in
        any mode but a size-1 one). Either way each forward hands the backend tensors of its own,
        so that what a backend caches by tensor identity and version lives one step (a write
        through ``.data`` changes no version)."""
        tensors = list(self.adapter_tensors())
        if not torch.compiler.is_compiling() and ops.transformed():
            return tensors
        if not any(1 in t.shape for t in tensors):
            return [t.view_as(t) for t in tensors]
        return list(GradInParameterLayout.apply(*tensors))

    # -- names and errors ------------------------------------------------------------------
    def _label(self) -> str:
        name = self.adapter_name
        return f"{type(self).__name__} '{name}'" if name else type(self).__name__

    def _error(self, kind, message):
        return kind(f"{self._label()}: {message}")

    # -- forward ------------------------------------------------------------------
    @property
    def merged(self) -> bool:
        return self._merged_base is not None

    def base_weight(self) -> torch.Tensor:
        """The frozen base weight ``W`` (the weight itself, or what a merge kept of it)."""
        return self._merged_base if self.merged else self.weight

    def effective_weight(self) -> torch.Tensor:
        """``W'`` computed by the reference math, differentiable w.r.t. the adapter tensors (a copy of
        ``W`` when no adapter is active)."""
        if self.active_adapter is None:
            return self.base_weight().clone()
        return methods.effective_weight(self.base_weight(), self.adapter_tensors(), self.adapter_math, self.scale)

    def _is_linear(self) -> bool:
        return isinstance(self, nn.Linear)

    def _check_input(self, x: torch.Tensor):
        validation.input_tensor(x, self.weight, self._label())
        if self._is_linear():
            if x.dim() < 1 or x.shape[-1] != self.in_features:
                raise self._error(AdapterInputError, f"expected input with {self.in_features} features in its "
                                  f"last dimension, got shape {tuple(x.shape)}")
            return
        n = self.weight.dim() - 2
        if x.dim() not in (n + 1, n + 2):
            raise self._error(AdapterInputError, f"expected a {n + 1}-d (unbatched) or {n + 2}-d (batched) input, "
                              f"got shape {tuple(x.shape)}")
        channels = x.shape[-n - 1]
        if channels != self.in_channels:
            raise self._error(AdapterInputError, f"expected input with {self.in_channels} channels, got {channels} "
                              f"(input shape {tuple(x.shape)})")

    def _conv_input(self, x):
        """The input padded as nn.ConvNd pads it, and the padding left for the convolution itself."""
        n = self.weight.dim() - 2
        pads = self._reversed_padding_repeated_twice
        if self.padding_mode != "zeros":
            return F.pad(x, pads, mode=self.padding_mode), [0] * n
        if isinstance(self.padding, str):
            lefts, rights = pads[0::2][::-1], pads[1::2][::-1]
            if list(lefts) == list(rights):
                return x, list(lefts)
            return F.pad(x, pads), [0] * n
        return x, list(self.padding)

    _adapters_disabled = False  # set by named_adapters.disable_adapters

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The plain layer's op on the base weight ``W``, exactly as the nn class computes it."""
        if self._is_linear():
            return F.linear(x, self.base_weight(), self.bias)
        return self._conv_forward(x, self.base_weight(), self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if self._adapters_disabled or self.active_adapter is None:
            return self.base_forward(x)
        if self.merged:
            return super().forward(x)
        if self.strategy == "fused":
            problem = strategies.cannot_run(self.strategy, x.device)
            if problem:
                raise self._error(AdapterConfigError, problem)
        dropped = F.dropout(x, self.dropout, True) if self.dropout > 0 and self.training else None
        if self._is_linear():
            flat = lambda t: None if t is None else t.reshape(-1, t.shape[-1])  # noqa: E731
            y = strategies.adapted_forward(flat(x), self.weight, self.bias, self._adapter_inputs(), self.adapter_math,
                                           self.scale, dropped_x=flat(dropped), strategy=self.strategy)
            return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])  # no view for FSDP2 to warn on
        unbatched = x.dim() == self.weight.dim() - 1
        if unbatched:
            x = x.unsqueeze(0)
            dropped = None if dropped is None else dropped.unsqueeze(0)
        x, padding = self._conv_input(x)
        if dropped is not None:
            dropped, _ = self._conv_input(dropped)
        geometry = (list(self.stride), padding, list(self.dilation), self.groups)
        y = strategies.adapted_forward(x, self.weight, self.bias, self._adapter_inputs(), self.adapter_math,
                                       self.scale, geometry, dropped, self.strategy)
        return y.squeeze(0) if unbatched else y

    # -- merge ------------------------------------------------------------------
    @torch.no_grad()
    def checked_effective_weight(self, action: str = "merge") -> torch.Tensor:
        """``W'``, detached; NonFiniteError (naming ``action``) if it holds inf or NaN."""
        merged = self.effective_weight().detach()
        validation.finite_weight(merged, self._merged_base if self.merged else self.weight, self._label(), action)
        return merged

    @torch.no_grad()
    def merge(self) -> None:
        """Write ``W'`` into ``weight``; forward then runs the plain layer. A no-op when merged.

        The base weight is kept (not copied) so that ``unmerge`` restores it bit for bit. A ``W'``
        holding inf or NaN is refused (NonFiniteError) and the layer left as it was. The weight
        Parameter itself is updated: every module holding it sees ``W'`` (``lk.merge`` on a model
        refuses weights tied to other modules).
        """
        if not self.merged:
            self._set_merged(self.checked_effective_weight("merge"))

    def _set_merged(self, merged: torch.Tensor) -> None:
        self._merged_base = self.weight.data
        self.weight.data = merged

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the exact base weight. A no-op when not merged."""
        if not self.merged:
            return
        self.weight.data = self._merged_base
        self._merged_base = None

    def to_plain(self, merge: bool = True) -> nn.Module:
        """A plain nn layer holding ``W'`` (``merge``; a new Parameter, refused if non-finite; a merged
        layer's the ``W'`` it holds, which a weighted merge made from several adapters) or the base
        weight (this layer's own Parameter when unmerged), and this layer's bias."""
        base = self._nn_base()
        plain = base(**self._base_kwargs(self), device="meta", dtype=self.weight.dtype)
        if merge and self.merged:
            plain.weight = nn.Parameter(self.weight.detach().clone(), requires_grad=self.weight.requires_grad)
        elif merge or self.merged:
            weight = self.checked_effective_weight("unload(merge=True)") if merge else self._merged_base
            plain.weight = nn.Parameter(weight, requires_grad=self.weight.requires_grad)
        else:
            plain.weight = self.weight
        plain.bias = self.bias
        plain.train(self.training)
        return plain

    # -- state dict: it says whether the layer is merged ------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged:
            destination[prefix + BASE_WEIGHT_KEY] = self._merged_base

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """``weight`` alone: an unmerged layer holding it. ``weight`` and ``base_weight``: a merged
        layer holding ``W' = weight`` over the base ``base_weight``. Neither: the merged state is kept."""
        weight_key, base_key = prefix + "weight", prefix + BASE_WEIGHT_KEY
        base = state_dict.pop(base_key, None)
        merged = None
        if weight_key not in state_dict:
            if base is not None:
                error_msgs.append(f"{base_key} (the base weight of a merged layer) given without {weight_key}")
        else:
            if base is not None:
                merged, state_dict[weight_key] = state_dict[weight_key], base
            given = {weight_key: state_dict[weight_key] if merged is None else merged, base_key: base}
            wrong = {k: tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for k, t in given.items()
                     if t is not None and not (isinstance(t, torch.Tensor) and t.shape == self.weight.shape)}
            if wrong:
                del state_dict[weight_key]
                merged = None
                error_msgs.extend(f"{k}: expected a tensor of shape {tuple(self.weight.shape)} (the shape in the "
                                  f"current model), got {got}" for k, got in wrong.items())
            else:
                self.unmerge()
        errors = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if merged is not None and len(error_msgs) == errors:
            with torch.no_grad():
                assign = local_metadata.get("assign_to_params_buffers", False)
                self._set_merged(merged if assign else torch.empty_like(self.weight).copy_(merged))

    def extra_repr(self) -> str:
        if self.active_adapter is None:
            adapter = f"{self.adapter_method}(no active adapter)"
        else:
            adapter = f"{self.adapter_method}(" + ", ".join(f"{k}={v}" for k, v in self.adapter_config().items()) + ")"
        if self.held_adapters() != [DEFAULT_ADAPTER]:
            adapter += f", active_adapter={self.active_adapter!r} of {self.held_adapters()}"
        merged = ", merged" if self.merged else ""
        return f"{super().extra_repr()}, {adapter}, strategy={self.strategy}{merged}"
