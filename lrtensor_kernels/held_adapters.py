"""A layer's named adapters: which it holds, which one runs, and how they are kept.

A layer holds adapters of its own method, each under a name (``"default"`` for the first), at
most one of them active. The active adapter's tensors are the layer's own attributes (``core``,
``factors``, ``lora_A``...): what strategies, backends, ``adapter_state()`` and the state dict
see, exactly as for a layer with one adapter. The others sit frozen in ``inactive_adapters``, a
ModuleDict that exists only while there are any (their state dict keys are
``inactive_adapters.<name>.<tensor>``), each as a :class:`StoredAdapter` with the keyword
arguments that rebuild it. Switching moves Parameter objects, never their data, so an
optimiser's state stays with its adapter. Model-level functions: :mod:`lrtensor_kernels.named_adapters`.
"""
from __future__ import annotations

import contextlib
from typing import Optional

from torch import nn

DEFAULT_ADAPTER = "default"
INACTIVE_ADAPTERS = "inactive_adapters"  # the ModuleDict of a layer's inactive named adapters


class StoredAdapter(nn.Module):
    """An inactive named adapter: its tensors (frozen) under the attribute names its layer gives
    them, and ``config``, the keyword arguments that rebuild it (the layer's ``adapter_config()``)."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = dict(config)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config.items())


class HeldAdapters:
    """The named-adapter bookkeeping of :class:`~lrtensor_kernels.adapter_layer.AdapterLayer`."""

    active_adapter: Optional[str] = DEFAULT_ADAPTER  # the name of the adapter the layer runs (None: none)

    def held_adapters(self) -> list:
        """The names of the adapters this layer holds, in the order they were added."""
        return list(getattr(self, "_held", [DEFAULT_ADAPTER]))

    def _stored(self) -> dict:
        return dict(self._modules.get(INACTIVE_ADAPTERS) or {})

    def adapter_state_of(self, name: str) -> dict:
        """The tensors of the adapter ``name`` by tensor name (as ``adapter_state`` for the active one)."""
        if name == self.active_adapter:
            return self.adapter_state()
        return dict(self._stored()[name].named_parameters())

    def adapter_config_of(self, name: str) -> dict:
        """The keyword arguments that rebuild the adapter ``name`` (``adapter_config`` of the active one)."""
        return self.adapter_config() if name == self.active_adapter else dict(self._stored()[name].config)

    def _stash(self) -> None:
        """Move the active adapter (tensors, frozen, and configuration) to ``inactive_adapters``."""
        name = self.active_adapter
        if name is None:
            return
        stored = StoredAdapter(self.adapter_config())
        for attribute in self.adapter_param_names:
            value = getattr(self, attribute)
            delattr(self, attribute)
            setattr(stored, attribute, value)
        self._store(name, stored)
        self.active_adapter = None

    def _store(self, name: str, stored: StoredAdapter) -> None:
        stored.requires_grad_(False)
        if INACTIVE_ADAPTERS not in self._modules:
            self.add_module(INACTIVE_ADAPTERS, nn.ModuleDict())
        self._modules[INACTIVE_ADAPTERS][name] = stored

    def _unstore(self, name: str) -> StoredAdapter:
        inactive = self._modules[INACTIVE_ADAPTERS]
        stored = inactive[name]
        del inactive[name]
        if not len(inactive):
            del self._modules[INACTIVE_ADAPTERS]
        return stored

    def _unstash(self, name: str) -> None:
        """Make the stored adapter ``name`` the active one (trainable); none may be active."""
        stored = self._unstore(name)
        config = dict(stored.config)
        self.dropout = config.pop("dropout")
        self._configure(**config)
        for attribute, value in list(stored._parameters.items()) + list(stored._modules.items()):
            delattr(stored, attribute)
            setattr(self, attribute, value)
        self.active_adapter = name
        for p in self.adapter_parameters():
            p.requires_grad_(True)

    def _activate(self, name: Optional[str]) -> None:
        """Run the adapter ``name`` (a held one) from now on, or none (``None``: the base layer)."""
        if name == self.active_adapter:
            return
        self._stash()
        if name is not None:
            self._unstash(name)

    @contextlib.contextmanager
    def _activated(self, name: str):
        """The adapter ``name`` active inside the block (its tensors as the layer's attributes)."""
        previous, requires = self.active_adapter, {id(p): p.requires_grad for p in self._all_adapter_parameters()}
        self._activate(name)
        try:
            yield self
        finally:
            self._activate(previous)
            for p in self._all_adapter_parameters():
                p.requires_grad_(requires[id(p)])

    def _all_adapter_parameters(self) -> list:
        return self.adapter_parameters() + [p for a in self._stored().values() for p in a.parameters()]

    def _add_stored(self, name: str, stored: StoredAdapter) -> None:
        """Hold ``stored`` (built by ``build_stored``) as the inactive adapter ``name``."""
        self._store(name, stored)
        self._held = self.held_adapters() + [name]

    def build_stored(self, **adapter_kwargs) -> StoredAdapter:
        """A new adapter of this layer's method and geometry (``adapter_kwargs`` as the constructor
        takes them), initialised as a fresh layer's, on the weight's device; the layer is unchanged."""
        base = self._nn_base()
        twin = base(**self._base_kwargs(self), device="meta", dtype=self.weight.dtype)
        twin.weight = nn.Parameter(self.base_weight().detach(), requires_grad=False)
        fresh = type(self).from_module(twin, **adapter_kwargs)
        stored = StoredAdapter(fresh.adapter_config())
        for attribute in fresh.adapter_param_names:
            setattr(stored, attribute, getattr(fresh, attribute))
        return stored

    def _remove_adapter(self, name: str) -> None:
        """Drop the adapter ``name``; if it was active, none is active afterwards."""
        if name == self.active_adapter:
            self._stash()
        self._unstore(name)
        self._held = [n for n in self.held_adapters() if n != name]
