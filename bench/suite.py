"""The shape suite and the providers the benchmark compares.

A *shape* is one layer of a real network (a Conv2d or a Linear, with its batch and input
size). A *provider* is one way to train that layer: a setup function that builds it on a
device and returns a :class:`Prepared` (the forward to time, the tensors it trains, and an
``oracle`` that computes the same function by another route, used by ``--verify``).

Nothing here touches CUDA at import time.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import math
import warnings
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
from torch import Tensor, nn

import lrtensor_kernels as lk
from lrtensor_kernels.backend import native_available, native_has_cuda_kernels, triton_available, triton_interpreted
from lrtensor_kernels.layers import LAYERS
from lrtensor_kernels.ops import base_op

# ---------------------------------------------------------------------------------------------
# shapes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """One layer to benchmark. ``batch`` counts images (conv) or tokens (linear); ``size`` is the
    input height = width of a convolution."""

    name: str
    kind: str  # "conv2d" or "linear"
    in_features: int
    out_features: int
    batch: int
    size: int = 0
    kernel: int = 1
    stride: int = 1
    padding: int = 0
    groups: int = 1
    bias: bool = False

    def input_shape(self) -> tuple:
        if self.kind == "linear":
            return (self.batch, self.in_features)
        return (self.batch, self.in_features, self.size, self.size)

    def output_size(self) -> int:
        return (self.size + 2 * self.padding - self.kernel) // self.stride + 1

    def output_shape(self) -> tuple:
        if self.kind == "linear":
            return (self.batch, self.out_features)
        return (self.batch, self.out_features, self.output_size(), self.output_size())

    def weight_numel(self) -> int:
        return self.out_features * (self.in_features // self.groups) * self.kernel ** 2

    def geometry(self) -> tuple:
        """``(stride, padding, dilation, groups)`` as :func:`lrtensor_kernels.ops.base_op` takes them."""
        if self.kind == "linear":
            return [], [], [], 1
        return [self.stride] * 2, [self.padding] * 2, [1, 1], self.groups

    def describe(self) -> str:
        bias = ", bias" if self.bias else ""
        if self.kind == "linear":
            return f"Linear {self.in_features}->{self.out_features}{bias} on {self.batch} tokens"
        groups = f" g{self.groups}" if self.groups > 1 else ""
        batch, channels, height, width = self.input_shape()
        return (f"Conv2d {self.in_features}->{self.out_features} k{self.kernel} s{self.stride} "
                f"p{self.padding}{groups}{bias} on {batch}x{channels}x{height}x{width}")


def conv(name, in_ch, out_ch, size, batch, kernel=3, stride=1, padding=None, groups=1, bias=False) -> Shape:
    """A Conv2d shape; ``padding`` defaults to ``kernel // 2``."""
    padding = kernel // 2 if padding is None else padding
    return Shape(name, "conv2d", in_ch, out_ch, batch, size, kernel, stride, padding, groups, bias)


def linear(name, in_f, out_f, tokens, bias=False) -> Shape:
    return Shape(name, "linear", in_f, out_f, tokens, bias=bias)


def _llama_linears(tokens: int) -> list:
    return [linear(f"linear/{i}-{o}_t{tokens}", i, o, tokens)
            for i, o in ((4096, 4096), (4096, 11008), (11008, 4096), (4096, 1024))]


SUITE = [
    # ResNet-50 (no conv bias), batch 64
    conv("resnet50/3x3_64-64_56", 64, 64, 56, 64),
    conv("resnet50/1x1_64-256_56", 64, 256, 56, 64, kernel=1),
    conv("resnet50/3x3s2_128-128_56", 128, 128, 56, 64, stride=2),
    conv("resnet50/3x3_256-256_14", 256, 256, 14, 64),
    conv("resnet50/3x3_512-512_7", 512, 512, 7, 64),
    conv("resnet50/1x1s2_1024-2048_14", 1024, 2048, 14, 64, kernel=1, stride=2),
    # ConvNeXt-T, batch 64
    conv("convnext_t/stem_3-96_k4s4_224", 3, 96, 224, 64, kernel=4, stride=4, padding=0, bias=True),
    conv("convnext_t/dw7x7_96_56", 96, 96, 56, 64, kernel=7, groups=96, bias=True),
    conv("convnext_t/dw7x7_384_14", 384, 384, 14, 64, kernel=7, groups=384, bias=True),
    conv("convnext_t/down_192-384_k2s2_28", 192, 384, 28, 64, kernel=2, stride=2, padding=0, bias=True),
    # Stable Diffusion 1.5 UNet, batch 4
    conv("sd15_unet/3x3_320-320_64", 320, 320, 64, 4, bias=True),
    conv("sd15_unet/3x3_1280-1280_16", 1280, 1280, 16, 4, bias=True),
    conv("sd15_unet/3x3_2560-1280_8", 2560, 1280, 8, 4, bias=True),
    conv("sd15_unet/3x3_1920-640_32", 1920, 640, 32, 4, bias=True),
    conv("sd15_unet/3x3_960-320_64", 960, 320, 64, 4, bias=True),
    # Linear: LLaMA-7B projections at 4096 and 16384 tokens, ConvNeXt-T MLP at 64 x 14 x 14 tokens
    *_llama_linears(4096),
    *_llama_linears(16384),
    linear("linear/384-1536_t12544", 384, 1536, 12544, bias=True),
]

# The CPU variant of every shape (one step of any provider within ~50 ms on one CPU thread):
# conv channels / 4 (never below 3, never above the original), spatial size / 2 (never below the
# kernel), batch 2; linear features / 8, tokens / 64 (so the 4096- and 16384-token rows stay two
# different layers: 64 and 256 tokens).
CPU_CHANNEL_DIVISOR = 4
CPU_FEATURE_DIVISOR = 8
CPU_SPATIAL_DIVISOR = 2
CPU_BATCH = 2
CPU_TOKEN_DIVISOR = 64
CPU_SCALING_NOTE = (f"conv channels / {CPU_CHANNEL_DIVISOR}, spatial size / {CPU_SPATIAL_DIVISOR}, "
                    f"batch {CPU_BATCH}; linear features / {CPU_FEATURE_DIVISOR}, tokens / {CPU_TOKEN_DIVISOR}")


def _divided(channels: int, divisor: int) -> int:
    return max(min(channels, 3), channels // divisor)


def scaled_for_cpu(shape: Shape) -> Shape:
    """The same layer with fewer channels, a smaller input and a small batch (see CPU_SCALING_NOTE)."""
    if shape.kind == "linear":
        return replace(shape, in_features=_divided(shape.in_features, CPU_FEATURE_DIVISOR),
                       out_features=_divided(shape.out_features, CPU_FEATURE_DIVISOR),
                       batch=max(1, shape.batch // CPU_TOKEN_DIVISOR))
    in_ch = _divided(shape.in_features, CPU_CHANNEL_DIVISOR)
    out_ch = _divided(shape.out_features, CPU_CHANNEL_DIVISOR)
    if shape.groups not in (1, shape.in_features):
        raise ValueError(f"{shape.name}: only dense or depthwise convolutions can be scaled")
    groups = 1 if shape.groups == 1 else in_ch
    size = max(shape.kernel, math.ceil(shape.size / CPU_SPATIAL_DIVISOR))
    return replace(shape, in_features=in_ch, out_features=out_ch, groups=groups, size=size, batch=CPU_BATCH)


QUICK_SHAPES = ("resnet50/3x3_64-64_56", "convnext_t/dw7x7_96_56", "sd15_unet/3x3_320-320_64",
                "linear/4096-4096_t4096")


def select_shapes(patterns: Optional[list], quick: bool) -> list:
    """The suite, filtered by name substrings (any matches) and, with ``quick``, to one shape per family."""
    shapes = [s for s in SUITE if not quick or s.name in QUICK_SHAPES]
    if patterns:
        shapes = [s for s in shapes if any(p in s.name for p in patterns)]
    return shapes


# ---------------------------------------------------------------------------------------------
# providers
# ---------------------------------------------------------------------------------------------

METHODS = ("flora", "lora", "liera", "ssl", "ssb")
LORA_RANK = 8  # the rank of the LoRA baselines, of the "lora" method and of LieRA's lora delta
LORA_ALPHA = 8.0  # LieRA's
# the LoRA baselines' alpha: scaling alpha / r = 2, so that an implementation that drops or
# misplaces its scaling differs from the oracles, which apply LORA_BASELINE_SCALING themselves
LORA_BASELINE_ALPHA = 16.0
LORA_BASELINE_SCALING = LORA_BASELINE_ALPHA / LORA_RANK
METHOD_OPTIONS = {
    "flora": {},  # package defaults: conv ranks (16, 16, 2, 2), scale 4; linear ranks (8, 8), scale 2
    "lora": {"rank": LORA_RANK, "alpha": LORA_BASELINE_ALPHA},  # this package's LoRA at the baselines' scaling
    "liera": {"rank": LORA_RANK, "alpha": LORA_ALPHA, "mode": "exp", "delta": "lora"},
    "ssl": {},
    "ssb": {},
}
ADAPTER_NOISE_STD = 0.05  # added to every adapter tensor, so that no delta is zero and no scale is one


class ProviderUnavailable(Exception):
    """The provider cannot run here (reported as a skipped row, not as an error)."""


@dataclass(frozen=True)
class Context:
    """Where and how the layers are built."""

    device: torch.device
    dtype: torch.dtype
    seed: int = 0


@dataclass
class Prepared:
    """One provider's layer on one shape.

    ``forward(x)`` is what is timed (the backward is autograd from its output); ``trainable`` are
    the tensors that receive gradients besides the input; ``oracle(x)`` computes the same function
    from the same tensors by another route; ``failure`` is the row status and note prefix given to an
    exception raised while running (``("skipped", ...)`` where it means the provider is not usable here);
    ``strategy_of(x)``: for an adapter layer, the strategy it runs on ``x`` (the cost model's choice
    under "auto")."""

    forward: Callable[[Tensor], Tensor]
    trainable: list
    oracle: Optional[Callable[[Tensor], Tensor]] = None
    oracle_name: str = ""
    failure: tuple = ("error", "")
    strategy_of: Optional[Callable[[Tensor], str]] = None  # the strategy an adapter layer runs on an input
    # ``(x, grad_out) -> (y, grad_x, trainable grads)`` of the same function in float64 (bench/verify.py
    # arbitrates with it where provider and oracle disagree)
    float64: Optional[Callable[[Tensor, Tensor], tuple]] = None


@contextlib.contextmanager
def seeded(seed: int):
    """Runs the block with the CPU generator seeded with ``seed``, then restores its state (CUDA untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def make_inputs(shape: Shape, ctx: Context) -> tuple:
    """The input (requires grad, as inside a network) and the output gradient of one shape."""
    generator = torch.Generator().manual_seed(ctx.seed + 1)
    x = torch.randn(shape.input_shape(), generator=generator).to(ctx.device, ctx.dtype)
    grad_out = torch.randn(shape.output_shape(), generator=generator).to(ctx.device, ctx.dtype)
    return x.requires_grad_(True), grad_out


def base_module(shape: Shape, ctx: Context) -> nn.Module:
    """The plain nn layer of ``shape``, initialised from ``ctx.seed`` (the same weights for every provider)."""
    with seeded(ctx.seed):
        if shape.kind == "linear":
            module = nn.Linear(shape.in_features, shape.out_features, bias=shape.bias)
        else:
            module = nn.Conv2d(shape.in_features, shape.out_features, shape.kernel, shape.stride, shape.padding,
                               groups=shape.groups, bias=shape.bias)
    return module.to(ctx.device, ctx.dtype)


def freeze(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module


@torch.no_grad()
def perturb(params: list, ctx: Context) -> list:
    """Adds N(0, ADAPTER_NOISE_STD^2) noise (seeded, drawn on the CPU) to every tensor in ``params``."""
    generator = torch.Generator().manual_seed(ctx.seed + 2)
    for p in params:
        p.add_(ADAPTER_NOISE_STD * torch.randn(p.shape, generator=generator).to(p.device, p.dtype))
    return params


def functional_forward(shape: Shape, weight_of: Callable[[], Tensor], bias: Optional[Tensor]):
    """``x -> base_op(x, weight_of(), bias)`` with the geometry of ``shape``."""
    stride, padding, dilation, groups = shape.geometry()

    def forward(x: Tensor) -> Tensor:
        return base_op(x, weight_of(), bias, stride, padding, dilation, groups)

    return forward


def on_backend(module: nn.Module, backend: str) -> Callable[[Tensor], Tensor]:
    """``x -> module(x)`` with the lrtensor_kernels backend set to ``backend`` for the call."""

    def forward(x: Tensor) -> Tensor:
        with lk.use_backend(backend):
            return module(x)

    return forward


def setup_frozen(shape: Shape, ctx: Context) -> Prepared:
    """Plain nn layer with weight and bias frozen: the backward computes only the input gradient (the floor)."""
    layer = freeze(base_module(shape, ctx))
    return Prepared(layer, [], functional_forward(shape, lambda: layer.weight, layer.bias), "functional op")


def setup_full_ft(shape: Shape, ctx: Context) -> Prepared:
    """Plain nn layer with weight and bias trainable: full fine-tuning."""
    layer = base_module(shape, ctx)
    return Prepared(layer, list(layer.parameters()),
                    functional_forward(shape, lambda: layer.weight, layer.bias), "functional op")


def lora_delta_forward(shape: Shape, down: Tensor, up: Tensor, scaling: float):
    """``x -> op(x, scaling * up @ down)``: a LoRA update folded into one kernel, for the oracles.

    ``down`` is ``(r, c_in / g, k, k)`` (conv) or ``(r, in)`` (linear), ``up`` is ``(out, r, 1, 1)`` or
    ``(out, r)``; the kernel is ``(out, c_in / g, k, k)``, applied with the shape's stride and padding
    and ``g = in_features / down.shape[1]`` groups (1 for a dense ``down``, also on a depthwise base)."""
    stride, padding, dilation, _ = shape.geometry()
    groups = shape.in_features // down.shape[1]

    def forward(x: Tensor) -> Tensor:
        kernel = (scaling * (up.flatten(1) @ down.flatten(1))).reshape(up.shape[0], *down.shape[1:])
        return base_op(x, kernel.to(x.dtype), None, stride, padding, dilation, groups)

    return forward


def lora_oracle(shape: Shape, base: nn.Module, down: Tensor, up: Tensor, scaling: float):
    """``x -> op(x, W) + op(x, scaling * up @ down)`` from the base layer's and the adapter's tensors."""
    frozen = functional_forward(shape, lambda: base.weight, base.bias)
    delta = lora_delta_forward(shape, down, up, scaling)
    return lambda x: frozen(x) + delta(x)


class PlainLoRA(nn.Module):
    """LoRA in plain PyTorch, built as PEFT builds it: ``base(x) + scaling * B(A(x))``, ``scaling = alpha / r``.

    Linear: A = Linear(in, r), B = Linear(r, out). Conv: A = a k x k Conv2d from the input channels
    down to r channels with the base layer's stride, padding and dilation (dense, also for a grouped
    base), B = a 1x1 Conv2d up to the output channels. No bias, no dropout; base frozen; weights in the
    base layer's dtype."""

    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__()
        self.base = freeze(base)
        options = dict(bias=False, device=base.weight.device, dtype=base.weight.dtype)
        if isinstance(base, nn.Linear):
            self.lora_A = nn.Linear(base.in_features, rank, **options)
            self.lora_B = nn.Linear(rank, base.out_features, **options)
        else:
            self.lora_A = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                                    base.dilation, **options)
            self.lora_B = nn.Conv2d(rank, base.out_channels, 1, **options)
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = alpha / rank

    def adapter_parameters(self) -> list:
        return [self.lora_A.weight, self.lora_B.weight]

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scaling


def setup_torch_lora(shape: Shape, ctx: Context) -> Prepared:
    """The plain-PyTorch LoRA (:class:`PlainLoRA`, rank LORA_RANK, alpha LORA_BASELINE_ALPHA), A and B randomised."""
    with seeded(ctx.seed + 3):
        lora = PlainLoRA(base_module(shape, ctx), LORA_RANK, LORA_BASELINE_ALPHA)
    oracle = lora_oracle(shape, lora.base, lora.lora_A.weight, lora.lora_B.weight, LORA_BASELINE_SCALING)
    return Prepared(lora, perturb(lora.adapter_parameters(), ctx), oracle, "base op + merged LoRA kernel",
                    strategy_of=lambda x: "bypass")


def adapter_layer(shape: Shape, ctx: Context, method: str, strategy: str = "auto") -> lk.AdapterLayer:
    """The lrtensor_kernels layer of ``method`` around the frozen base layer, adapter tensors randomised."""
    base = freeze(base_module(shape, ctx))
    with seeded(ctx.seed + 3):
        layer = LAYERS[method][type(base)].from_module(base, strategy=strategy, **METHOD_OPTIONS[method])
    perturb(layer.adapter_parameters(), ctx)
    return layer


def float64_route(layer: lk.AdapterLayer) -> Callable[[Tensor, Tensor], tuple]:
    """``(x, grad_out) -> (y, grad_x, adapter grads)`` of a float64 copy of ``layer`` on backend
    "reference": the same function of the same (rounded) tensors without rounding errors worth the name."""

    def run(x: Tensor, grad_out: Tensor) -> tuple:
        twin = copy.deepcopy(layer).double()
        if twin.strategy == "fused":  # the triton backend's alone; merged is the same function
            twin.strategy = "merged"
        x64 = x.detach().double().requires_grad_(True)
        with lk.use_backend("reference"):
            y = twin(x64)
        y.backward(grad_out.double())
        return y.detach(), x64.grad, [p.grad for p in twin.adapter_parameters()]

    return run


def strategy_of(layer: lk.AdapterLayer, backend: str) -> Callable[[Tensor], str]:
    """``x -> the strategy layer runs on x`` (by lk.plan, one forward)."""

    def resolve(x: Tensor) -> str:
        with lk.use_backend(backend):
            return lk.plan(nn.Sequential(layer), x)[0].strategy

    return resolve


def setup_reference(shape: Shape, ctx: Context, method: str, strategy: str = "auto") -> Prepared:
    """The adapter layer on backend "reference" (plain-PyTorch math under autograd)."""
    layer = adapter_layer(shape, ctx, method, strategy)
    oracle = functional_forward(shape, layer.effective_weight, layer.bias)
    return Prepared(on_backend(layer, "reference"), layer.adapter_parameters(), oracle, "functional op on W'",
                    strategy_of=strategy_of(layer, "reference"))


def require_triton(device: torch.device) -> None:
    if not triton_available():
        raise ProviderUnavailable("triton is not installed")
    if device.type != "cuda" and not triton_interpreted():
        raise ProviderUnavailable("triton needs CUDA, or TRITON_INTERPRET=1 on the CPU")


def setup_triton(shape: Shape, ctx: Context, method: str, strategy: str = "auto") -> Prepared:
    """The adapter layer on backend "triton" (fused weight transform and backward projection)."""
    require_triton(ctx.device)
    layer = adapter_layer(shape, ctx, method, strategy)
    return Prepared(on_backend(layer, "triton"), layer.adapter_parameters(), reference_oracle(layer),
                    f"{method}_reference", strategy_of=strategy_of(layer, "triton"), float64=float64_route(layer))


def reference_oracle(layer: lk.AdapterLayer) -> Callable[[Tensor], Tensor]:
    """``x -> layer(x)`` on the reference backend; a layer set to "fused" (which runs on the triton
    backend only) runs merged there, the same function."""
    run = on_backend(layer, "reference")
    if layer.strategy != "fused":
        return run

    def forward(x: Tensor) -> Tensor:
        layer.strategy = "merged"
        try:
            return run(x)
        finally:
            layer.strategy = "fused"

    return forward


def setup_compiled(shape: Shape, ctx: Context, method: str, strategy: str = "auto") -> Prepared:
    """``torch.compile`` (static shapes, fresh cache) of the adapter layer on backend "reference".

    Compilation happens on the first call, i.e. in the warm-up; a failure there skips the row."""
    layer = adapter_layer(shape, ctx, method, strategy)
    torch._dynamo.reset()
    compiled = torch.compile(layer, dynamic=False)
    return Prepared(on_backend(compiled, "reference"), layer.adapter_parameters(), on_backend(layer, "reference"),
                    f"{method}_reference", failure=("skipped", "torch.compile failed: "),
                    strategy_of=strategy_of(layer, "reference"), float64=float64_route(layer))


def setup_native(shape: Shape, ctx: Context, method: str, strategy: str = "auto") -> Prepared:
    """The adapter layer on backend "native" (C++ kernels on the CPU, CUDA C++ on a GPU)."""
    if not native_available():
        from lrtensor_kernels.kernels import native_build

        raise ProviderUnavailable(f"native backend unavailable: {native_build.unavailable_reason()}")
    if ctx.device.type == "cuda" and not native_has_cuda_kernels():
        raise ProviderUnavailable("the native library was built without its CUDA kernels")
    layer = adapter_layer(shape, ctx, method, strategy)
    return Prepared(on_backend(layer, "native"), layer.adapter_parameters(), on_backend(layer, "reference"),
                    f"{method}_reference", strategy_of=strategy_of(layer, "native"), float64=float64_route(layer))


BASELINE_PROVIDERS = {"frozen": setup_frozen, "full_ft": setup_full_ft, "torch_lora": setup_torch_lora}
BASELINE_DESCRIPTIONS = {"frozen": ("frozen layer", "torch"), "full_ft": ("full fine-tuning", "torch"),
                         "torch_lora": ("LoRA", "plain PyTorch")}  # (what it is, what runs it)
ADAPTER_ROUTES = {"reference": setup_reference, "native": setup_native, "triton": setup_triton,
                  "compiled": setup_compiled}
CPU_ROUTES = ("reference", "native")
FLOOR = "frozen"
FULL_FINE_TUNING = "full_ft"
# The LoRA baseline of the summary's "x LoRA" column, in order of preference: the first of these that
# was measured in the run serves (real PEFT where installed, else the plain-PyTorch LoRA).
# `python -m bench.run --lora-baseline NAME` names another provider for one run.
LORA_BASELINES = ("peft_lora", "torch_lora")


def method_strategies(method: str) -> tuple:
    """The strategies that can run ``method``, "auto" first."""
    with warnings.catch_warnings():  # a 2x2 probe is always smaller than its adapter
        warnings.simplefilter("ignore", lk.OversizedAdapterWarning)
        probe = LAYERS[method][nn.Linear](2, 2, device="meta", **METHOD_OPTIONS[method])
    return ("auto",) + lk.strategies.cost.applicable(probe.adapter_math)


def route_strategies(method: str, route: str) -> tuple:
    """``method_strategies`` plus "fused" on the triton route (its kernels run there only)."""
    return method_strategies(method) + (("fused",) if route == "triton" else ())


def provider_name(method: str, route: str, strategy: str) -> str:
    """``<method>_<route>`` under "auto", ``<method>_<route>:<strategy>`` for a forced strategy."""
    return f"{method}_{route}" if strategy == "auto" else f"{method}_{route}:{strategy}"


def adapter_provider_parts(name: str) -> Optional[tuple]:
    """``(method, route, strategy)`` of a ``<method>_<route>[:<strategy>]`` provider (strategy "auto"
    when none is forced); None for the baselines and the external providers."""
    head, _, strategy = name.partition(":")
    method, _, route = head.rpartition("_")
    if method in METHODS and route in ADAPTER_ROUTES:
        return method, route, strategy or "auto"
    return None


def providers_for(device: torch.device, strategies: tuple = lk.STRATEGIES, extra_baselines: Optional[dict] = None
                  ) -> dict:
    """Provider name -> setup function, in table order: the baselines and ``extra_baselines`` (the
    real PEFT and LyCORIS layers of :mod:`bench.external`), then every method on every route this
    device runs (CPU: reference, native; CUDA: reference, native, triton, compiled), under each of
    ``strategies`` that can run it."""
    routes = ADAPTER_ROUTES if device.type == "cuda" else {r: ADAPTER_ROUTES[r] for r in CPU_ROUTES}
    providers = {**BASELINE_PROVIDERS, **(extra_baselines or {})}
    for method in METHODS:
        for route, setup in routes.items():
            for strategy in route_strategies(method, route):
                if strategy in strategies:
                    providers[provider_name(method, route, strategy)] = functools.partial(
                        setup, method=method, strategy=strategy)
    return providers


def triton_providers() -> dict:
    """The "<method>_triton" providers alone (verified on the CPU under TRITON_INTERPRET=1), every strategy."""
    return {provider_name(m, "triton", st): functools.partial(setup_triton, method=m, strategy=st)
            for m in METHODS for st in route_strategies(m, "triton")}


def select_providers(providers: dict, patterns: Optional[list]) -> dict:
    """The providers whose name contains any of ``patterns``, plus FLOOR (ratios need it)."""
    if not patterns:
        return providers
    return {name: setup for name, setup in providers.items()
            if name == FLOOR or any(p in name for p in patterns)}
