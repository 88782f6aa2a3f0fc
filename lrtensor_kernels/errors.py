"""The package's error types. Each is a ValueError or a TypeError, so code that catches those
keeps working; ``AdapterError`` catches them all. Messages name the layer (or file), the
argument, what was expected and what was given."""
from __future__ import annotations

import os
from typing import Optional


class AdapterError(Exception):
    """Base of every error this package raises on purpose."""


class AdapterConfigError(AdapterError, ValueError):
    """A hyperparameter or argument has a value the layer or function cannot use (a rank that is
    not an integer >= 1, a non-finite scale, an unknown method, a target that matches nothing)."""


class AdapterTypeError(AdapterError, TypeError):
    """A module, argument or input of the wrong type: a module that cannot be adapted, a target
    spec that is neither a name list nor a regex, an unknown keyword, an input of the wrong dtype."""


class AdapterInputError(AdapterError, ValueError):
    """A forward input of the wrong shape (channels, features, number of dimensions)."""


class AdapterFileError(AdapterError, ValueError):
    """An adapter directory that cannot be loaded into the model: missing, unreadable or malformed
    files, or files that do not match the model. ``path`` is the file (or directory) at fault."""

    def __init__(self, message: str, path: Optional[str] = None):
        super().__init__(message)
        self.path = None if path is None else os.fspath(path)


class NonFiniteError(AdapterError, ValueError):
    """``merge`` (or ``unload(merge=True)``, ``save_adapters``) refused to write non-finite values, or
    an adapter layer produced a non-finite output while ``detect_nonfinite`` was on."""


class SharedWeightError(AdapterError, ValueError):
    """``merge`` refused to write ``W'`` into a weight that another module of the model also holds."""


class OversizedAdapterWarning(UserWarning):
    """An adapter layer trains more numbers than its frozen weight holds (a rank too large for the
    layer: training the layer in full would cost fewer). Turn it into an error to refuse such ranks:
    ``warnings.filterwarnings("error", category=lk.OversizedAdapterWarning)``."""
