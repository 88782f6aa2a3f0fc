"""lrtensor_kernels: low-rank tensor adapters (FLoRA, LoRA, LieRA, SSL, SSB) for Conv1d/2d/3d and Linear.

Quick use::

    import lrtensor_kernels as lk
    names = lk.inject(model, "flora")            # every conv/linear, only adapters trainable
    ...train...
    lk.save_adapters(model, "adapters/")
    lk.merge(model)                              # zero-cost inference; lk.unmerge restores W exactly
"""
from ._version import __version__
from .budget import BudgetPlan, lora_parameter_count, ranks_for_budget
from .backend import BACKENDS, get_backend, set_backend, use_backend
from .errors import (
    AdapterConfigError,
    AdapterError,
    AdapterFileError,
    AdapterInputError,
    AdapterTypeError,
    NonFiniteError,
    OversizedAdapterWarning,
    SharedWeightError,
)
from .layers import (
    AdapterLayer,
    FLoRAConv1d,
    FLoRAConv2d,
    FLoRAConv3d,
    FLoRALinear,
    LieRAConv1d,
    LieRAConv2d,
    LieRAConv3d,
    LieRALinear,
    LoRAConv1d,
    LoRAConv2d,
    LoRAConv3d,
    LoRALinear,
    SSBConv1d,
    SSBConv2d,
    SSBConv3d,
    SSBLinear,
    SSLConv1d,
    SSLConv2d,
    SSLConv3d,
    SSLLinear,
)
from .methods import AdapterMath, effective_weight, tucker_product
from .official import load_official_flora, load_official_liera
from .lycoris import load_locon
from .regularizers import mpc_loss, tucker_orthogonality_loss
from .serialization import load_adapters, save_adapters
from .strategies import STRATEGIES
from .plan import Plan, plan
from .surgery import adapter_layers, inject, merge, unload, unmerge
from .named_adapters import delete_adapter, disable_adapters, set_adapter
from .summary import TrainableSummary, trainable_summary
from .diagnostics import detect_nonfinite, is_detect_nonfinite_enabled, set_detect_nonfinite

__all__ = [
    "__version__", "BACKENDS", "get_backend", "set_backend", "use_backend", "AdapterLayer",
    "FLoRAConv1d", "FLoRAConv2d", "FLoRAConv3d", "FLoRALinear",
    "LieRAConv1d", "LieRAConv2d", "LieRAConv3d", "LieRALinear", "LoRAConv1d", "LoRAConv2d", "LoRAConv3d", "LoRALinear",
    "SSLConv1d", "SSLConv2d", "SSLConv3d", "SSLLinear", "SSBConv1d", "SSBConv2d", "SSBConv3d", "SSBLinear",
    "AdapterMath", "effective_weight", "tucker_product", "mpc_loss", "tucker_orthogonality_loss", "save_adapters",
    "load_adapters",
    "adapter_layers", "inject", "merge", "unmerge", "unload", "STRATEGIES", "Plan", "plan",
    "AdapterError", "AdapterConfigError", "AdapterTypeError", "AdapterInputError", "AdapterFileError",
    "NonFiniteError", "OversizedAdapterWarning", "SharedWeightError", "detect_nonfinite", "set_detect_nonfinite",
    "is_detect_nonfinite_enabled",
    "BudgetPlan", "lora_parameter_count", "ranks_for_budget", "load_official_flora", "load_official_liera",
    "load_locon", "set_adapter", "delete_adapter", "disable_adapters", "TrainableSummary", "trainable_summary",
]
