"""Bad input gives a clear error (type and message checked) and changes nothing."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lrtensor_kernels as lk
from models import make_net


pytestmark = pytest.mark.usefixtures("reference_backend")


def snapshot(model):
    return dict(
        modules={n: (id(m), type(m)) for n, m in model.named_modules()},
        params={n: (id(p), p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()},
        buffers={n: b.detach().clone() for n, b in model.named_buffers()},
    )


def assert_unchanged(model, snap):
    now = snapshot(model)
    assert now["modules"] == snap["modules"]
    assert now["params"].keys() == snap["params"].keys()
    for n, (pid, value, grad) in snap["params"].items():
        nid, nvalue, ngrad = now["params"][n]
        assert nid == pid and ngrad == grad and torch.equal(nvalue, value), n
    assert all(torch.equal(now["buffers"][n], b) for n, b in snap["buffers"].items())


def inject_fails(model, error, match, *args, **kwargs):
    snap = snapshot(model)
    with pytest.raises(error, match=match):
        lk.inject(model, *args, **kwargs)
    assert_unchanged(model, snap)


# ----------------------------------------------------------------------------------------------
# constructor arguments
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ranks, match", [
    (0, r"FLoRAConv2d: ranks must be an integer >= 1, got 0"),
    (-3, r"FLoRAConv2d: ranks must be an integer >= 1, got -3"),
    ((2, 2, 2), r"FLoRAConv2d: ranks needs one entry per weight mode \(4, 3, 3, 3\) \(4 entries\), got \(2, 2, 2\)"),
    ((2, 2, 2, 2, 2), r"ranks needs one entry per weight mode .*got \(2, 2, 2, 2, 2\)"),
    ((2, 0, 1, 1), r"every entry of ranks must be an integer >= 1, got 0"),
    ((2, -1, 1, 1), r"every entry of ranks must be an integer >= 1, got -1"),
    ((2, 1.5, 1, 1), r"every entry of ranks must be an integer >= 1, got 1\.5"),
    ((2, True, 1, 1), r"every entry of ranks must be an integer >= 1, got True"),
], ids=["zero", "negative", "tuple-short", "tuple-long", "tuple-zero", "tuple-negative", "tuple-float",
        "tuple-bool"])
def test_bad_flora_ranks(ranks, match):
    with pytest.raises(ValueError, match=match):
        lk.FLoRAConv2d(3, 4, 3, ranks=ranks)


def test_bad_flora_linear_ranks():
    with pytest.raises(ValueError, match=r"FLoRALinear: ranks needs one entry per weight mode \(5, 3\)"):
        lk.FLoRALinear(3, 5, ranks=(2, 2, 1))
    with pytest.raises(ValueError, match=r"FLoRAConv1d: ranks must be an integer >= 1, got 0"):
        lk.FLoRAConv1d.from_module(nn.Conv1d(2, 2, 3), ranks=0)


@pytest.mark.parametrize("ranks", [2.0, True], ids=["float", "bool"])
def test_scalar_non_int_ranks_clear_error(ranks):
    with pytest.raises(ValueError, match=r"FLoRAConv2d: ranks must be an integer >= 1"):
        lk.FLoRAConv2d(3, 4, 3, ranks=ranks)


@pytest.mark.parametrize("delta", ["lora", "tucker"])
@pytest.mark.parametrize("rank", [0, -1, 1.5, True, "2"])
def test_bad_liera_rank(rank, delta):
    with pytest.raises(ValueError, match=r"LieRAConv2d: rank must be an integer >= 1, got "):
        lk.LieRAConv2d(3, 4, 3, rank=rank, delta=delta)


def test_bad_liera_mode_and_delta():
    with pytest.raises(ValueError,
                       match=r"LieRALinear: unknown mode 'second'; expected one of \('exp', 'first_order'\)"):
        lk.LieRALinear(3, 4, mode="second")
    with pytest.raises(ValueError, match=r"LieRAConv1d: unknown delta 'svd'; expected one of \('lora', 'tucker'\)"):
        lk.LieRAConv1d(3, 4, 3, delta="svd")
    with pytest.raises(ValueError, match=r"unknown mode 'mul'"):
        lk.LieRAConv3d.from_module(nn.Conv3d(1, 1, 1), mode="mul")


def test_from_module_wrong_type():
    with pytest.raises(TypeError, match=r"FLoRAConv2d\.from_module expects a plain Conv2d, got Conv1d"):
        lk.FLoRAConv2d.from_module(nn.Conv1d(3, 4, 3))
    with pytest.raises(TypeError, match=r"SSLLinear\.from_module expects a plain Linear, got SSLLinear"):
        lk.SSLLinear.from_module(lk.SSLLinear(3, 4))
    with pytest.raises(TypeError, match=r"expects a plain Linear, got ReLU"):
        lk.LieRALinear.from_module(nn.ReLU())


def test_adapter_math_unknown_names():
    with pytest.raises(ValueError, match=r"unknown delta 'svd'"):
        lk.AdapterMath("svd", "add")
    with pytest.raises(ValueError, match=r"unknown combine 'pow'"):
        lk.AdapterMath("lora", "pow")


# ----------------------------------------------------------------------------------------------
# inject
# ----------------------------------------------------------------------------------------------
def test_inject_unknown_method():
    inject_fails(make_net(), ValueError,
                 r"unknown method 'loha'; expected one of \('flora', 'lora', 'liera', 'ssl', 'ssb'\)", "loha")


@pytest.mark.parametrize("target, match", [
    (["conv9"], r"target_modules entry 'conv9' matched no module of Net"),
    (["onv1"], r"target_modules entry 'onv1' matched no module"),  # suffixes match at a dot only
    (["head", "tail"], r"target_modules entry 'tail' matched no module"),
    (r"onv\d", r"target_modules regex 'onv\\\\d' matched no module"),  # full match only
    ("(", r"target_modules regex '\(' does not compile"),
], ids=["list", "partial-suffix", "second-entry", "regex-full-match", "bad-regex"])
def test_inject_target_matches_nothing(target, match):
    inject_fails(make_net(), ValueError, match, "flora", target_modules=target)


def test_inject_exclude_problems():
    inject_fails(make_net(), ValueError, r"exclude_modules entry 'nothing' matched no module", "ssl",
                 exclude_modules=["nothing"])
    inject_fails(make_net(), ValueError, r"no module to adapt", "ssl", target_modules=["head"],
                 exclude_modules=["head"])
    inject_fails(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)), ValueError, r"no module to adapt", "flora")


@pytest.mark.parametrize("target, match", [
    (["block.act"], r"module 'block\.act' is a ReLU; expected one of Conv1d, Conv2d, Conv3d, Linear"),
    (["bn"], r"module 'block\.bn' is a BatchNorm2d"),
    (["block"], r"module 'block' is a Block"),
    (["attn.out_proj"], r"module 'attn\.out_proj' is a NonDynamicallyQuantizableLinear"),
    (r"block\..*", r"module 'block\.(bn|act)' is a"),
], ids=["relu", "batchnorm", "container", "mha-out-proj", "regex-hits-bn"])
def test_inject_non_adaptable_target(target, match):
    inject_fails(make_net(), TypeError, match, "flora", target_modules=target)


def test_inject_already_adapted_target():
    net = make_net()
    lk.inject(net, "flora", target_modules=["head"])
    inject_fails(net, ValueError, r"module 'head' is already a FLoRALinear", "ssl", target_modules=["head", "pre"])


@pytest.mark.parametrize("method, kwargs, error, match", [
    ("flora", dict(ranks=0), ValueError, r"module 'pre': FLoRAConv3d: ranks must be an integer >= 1, got 0"),
    # fits the Conv2d layers, not the Conv3d/Conv1d/Linear ones: nothing may be installed
    ("flora", dict(ranks=(2, 2, 1, 1)), ValueError, r"module 'pre': FLoRAConv3d: ranks needs one entry per weight"),
    ("liera", dict(rank=-1), ValueError, r"module 'pre': LieRAConv3d: rank must be an integer >= 1, got -1"),
    ("liera", dict(mode="log"), ValueError, r"module 'pre': LieRAConv3d: unknown mode 'log'"),
    ("liera", dict(delta="cp"), ValueError, r"unknown delta 'cp'"),
    ("ssb", dict(dropout=1.0), ValueError, r"module 'pre': SSBConv3d: dropout must be in \[0, 1\), got 1\.0"),
    ("flora", dict(rnk=3), TypeError, r"module 'pre': FLoRAConv3d: unexpected keyword argument 'rnk'; closest: "
                                      r"'ranks'"),
    ("ssl", dict(ranks=3), TypeError, r"module 'pre': SSLConv3d: unexpected keyword argument 'ranks'\. Its keywords: "
                                      r"dropout, strategy and nn\.Conv3d's"),
], ids=["ranks-0", "ranks-tuple-partial", "rank-neg", "mode", "delta", "dropout", "unknown-kwarg", "ssl-ranks"])
def test_inject_bad_kwargs(method, kwargs, error, match):
    inject_fails(make_net(), error, match, method, **kwargs)


def test_inject_bad_kwargs_on_a_later_layer_installs_nothing():
    net = make_net()
    # ranks with 4 entries fit block.conv1/conv2 (found after pre is excluded) but not seq.0
    inject_fails(net, ValueError, r"module 'seq\.0': FLoRAConv1d: ranks needs one entry", "flora",
                 exclude_modules=["pre"], ranks=(2, 2, 1, 1))


# ----------------------------------------------------------------------------------------------
# wrong input at forward time
# ----------------------------------------------------------------------------------------------
METHODS = [("flora", {}), ("lora", {}), ("liera", {}), ("liera", dict(delta="tucker")), ("ssl", {}), ("ssb", {})]
M_IDS = ["flora", "lora", "liera-lora", "liera-tucker", "ssl", "ssb"]
PREFIX = {"flora": "FLoRA", "lora": "LoRA", "liera": "LieRA", "ssl": "SSL", "ssb": "SSB"}


@pytest.mark.parametrize("method, kwargs", METHODS, ids=M_IDS)
def test_wrong_channel_count_names_the_layer(method, kwargs):
    net = make_net()
    lk.inject(net, method, **kwargs)
    p = PREFIX[method]
    with pytest.raises(ValueError, match=rf"{p}Conv2d 'block\.conv1': expected input with 3 channels, got 5 "
                                         r"\(input shape \(2, 5, 6, 6\)\)"):
        net.block.conv1(torch.randn(2, 5, 6, 6))
    with pytest.raises(ValueError, match=rf"{p}Conv2d 'block\.conv1': expected input with 3 channels, got 2"):
        net.block.conv1(torch.randn(2, 6, 6))  # unbatched
    with pytest.raises(ValueError, match=rf"{p}Conv3d 'pre': expected input with 1 channels, got 2"):
        net(torch.randn(2, 2, 2, 5, 5))
    with pytest.raises(ValueError, match=rf"{p}Conv1d 'seq\.0': expected input with 4 channels, got 3"):
        net.seq(torch.randn(2, 3, 7))
    with pytest.raises(ValueError, match=rf"{p}Linear 'head': expected input with 4 features in its last "
                                         r"dimension, got shape \(3, 7\)"):
        net.head(torch.randn(3, 7))
    with pytest.raises(ValueError, match=rf"{p}Conv2d 'block\.conv2': expected a 3-d \(unbatched\) or 4-d "
                                         r"\(batched\) input, got shape \(1, 2, 4, 5, 5\)"):
        net.block.conv2(torch.randn(1, 2, 4, 5, 5))
    # the right input works (the checks above are about the channel count only)
    assert net(torch.randn(2, 1, 2, 5, 5)).shape == (2, 5)


def test_wrong_channel_count_unnamed_layer():
    with pytest.raises(ValueError, match=r"^SSBConv1d: expected input with 3 channels, got 4"):
        lk.SSBConv1d(3, 2, 1)(torch.randn(1, 4, 5))


# ----------------------------------------------------------------------------------------------
# backends
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["cuda", "Reference", "", "fused"])
def test_unknown_backend(name):
    before = lk.get_backend()
    with pytest.raises(ValueError,
                       match=rf"unknown backend '{name}'; expected one of \('auto', 'reference', 'triton', 'native'\)"):
        lk.set_backend(name)
    assert lk.get_backend() == before
    with pytest.raises(ValueError, match=rf"unknown backend '{name}'"):
        with lk.use_backend(name):
            pass
    assert lk.get_backend() == before


def test_use_backend_restores_after_an_error():
    lk.set_backend("auto")
    with pytest.raises(RuntimeError, match="boom"):
        with lk.use_backend("reference"):
            assert lk.get_backend() == "reference"
            raise RuntimeError("boom")
    assert lk.get_backend() == "auto"
    assert lk.BACKENDS == ("auto", "reference", "triton", "native")
