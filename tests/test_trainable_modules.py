"""inject(..., trainable_modules=...): modules trained in full beside the adapters, and their whole
state (parameters and buffers) in adapter files, with the same checks as the adapters."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import lrtensor_kernels as lk
from models import make_net
from oracle import randomize_adapter
from test_serialization import CONFIG, assert_unchanged, check_fails_unchanged, snapshot, tensors_file

pytestmark = pytest.mark.usefixtures("reference_backend")

ADAPTABLE = ["pre", "block.conv1", "block.conv2", "conv1", "seq.0", "head"]


def net_input(seed=1, n=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 2, 5, 5, generator=g)


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def adapter_param_names(model):
    return {f"{n}.{k}" for n, layer in lk.adapter_layers(model) for k in layer.adapter_state()}


def inject_fails(model, error, match, *args, **kwargs):
    snap = snapshot(model)
    with pytest.raises(error, match=match):
        lk.inject(model, *args, **kwargs)
    assert_unchanged(model, snap)


# ----------------------------------------------------------------------------------------------
# inject
# ----------------------------------------------------------------------------------------------
def test_trainable_modules_train_in_full_and_are_not_adapted():
    net = make_net()
    names = lk.inject(net, "flora", trainable_modules=["bn", "head"])
    assert names == [n for n in ADAPTABLE if n != "head"]  # the head trains in full, it gets no adapter
    assert type(net.head) is nn.Linear
    full = {"block.bn.weight", "block.bn.bias", "head.weight", "head.bias"}
    assert trainable_names(net) == adapter_param_names(net) | full
    # a later inject neither freezes nor adapts them
    net2 = make_net()
    lk.inject(net2, "flora", target_modules=["conv1"], trainable_modules=["head"])
    assert lk.inject(net2, "ssl") == ["pre", "block.conv2", "seq.0"]
    assert type(net2.head) is nn.Linear
    assert {"head.weight", "head.bias"} <= trainable_names(net2)


@pytest.mark.parametrize("spec, expected", [
    (["bn"], {"block.bn"}),
    (r"block\.bn|head", {"block.bn", "head"}),
    (["block", "block.bn"], {"block"}),  # nested names: the outer module covers the inner one
], ids=["suffix", "regex", "nested"])
def test_trainable_modules_matching(spec, expected):
    net = make_net()
    lk.inject(net, "ssb", target_modules=["seq.0"], trainable_modules=spec)
    marked = {n for n, _ in lk.trainable.marked_modules(net)}
    assert marked == expected
    owned = {n for n, _ in net.named_parameters() if any(n.startswith(m + ".") for m in expected)}
    assert trainable_names(net) == adapter_param_names(net) | owned


def test_gradients_reach_adapters_and_trainable_modules_only():
    net = make_net().train()
    lk.inject(net, "liera", target_modules=["conv1"], trainable_modules=["bn", "head"])
    net(net_input()).square().sum().backward()
    for n, p in net.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(target_modules=["head"], trainable_modules=["head"]), ValueError,
     r"module 'head' trains in full \(trainable_modules: 'head'\); it cannot also get an adapter"),
    (dict(target_modules=["block.conv1"], trainable_modules=["block"]), ValueError,
     r"module 'block\.conv1' trains in full \(trainable_modules: 'block'\)"),
    (dict(trainable_modules=["block.act"]), ValueError, r"module 'block\.act' \(ReLU\) has no parameter or buffer"),
    (dict(trainable_modules=["tail"]), ValueError, r"trainable_modules entry 'tail' matched no module of Net"),
    (dict(trainable_modules="bn"), ValueError, r"trainable_modules regex 'bn' matched no module"),
], ids=["target-and-trained", "target-inside-trained", "no-parameters", "no-match", "regex-full-match"])
def test_bad_trainable_modules(kwargs, error, match):
    inject_fails(make_net(), error, match, "flora", **kwargs)


def test_trainable_module_around_or_inside_an_adapter_layer():
    net = make_net()
    lk.inject(net, "flora", target_modules=["block.conv1"])
    inject_fails(net, ValueError, r"module 'block' contains the adapter layer 'block\.conv1'", "ssl",
                 target_modules=["head"], trainable_modules=["block"])
    inject_fails(net, ValueError, r"module 'block\.conv1\.factors' is inside the adapter layer 'block\.conv1' "
                 r"\(FLoRAConv2d\)", "ssl", target_modules=["head"], trainable_modules=["block.conv1.factors"])
    inject_fails(net, ValueError, r"module 'block\.conv1' is an adapter layer", "ssl", target_modules=["head"],
                 trainable_modules=["block.conv1"])


# ----------------------------------------------------------------------------------------------
# adapter files
# ----------------------------------------------------------------------------------------------
def trained_net(seed=0, steps=3):
    """Adapters on the convs, head and BatchNorm trained in full, a few steps in train mode (the
    BatchNorm running statistics move)."""
    net = make_net(seed)
    base_state = copy.deepcopy(net.state_dict())
    lk.inject(net, "flora", target_modules=r".*conv\d|pre", trainable_modules=["bn", "head"])
    for i, (_, layer) in enumerate(lk.adapter_layers(net)):
        randomize_adapter(layer, 50 + i, std=0.2)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.05)
    net.train()
    target = torch.arange(6) % 5
    for step in range(steps):
        opt.zero_grad()
        F.cross_entropy(net(net_input(seed=step)), target).backward()
        opt.step()
    return net.eval(), base_state


def fresh_base(base_state):
    net = make_net(seed=7)
    net.load_state_dict(base_state)
    return net


def test_round_trip_restores_trained_modules_and_buffers(tmp_path):
    net, base_state = trained_net()
    x = net_input(seed=9)
    lk.save_adapters(net, str(tmp_path))
    config = json.loads((tmp_path / CONFIG).read_text())
    assert config["trainable_modules"] == {
        "block.bn": {"module_type": "BatchNorm2d", "tensors": {
            "weight": {"shape": [4], "dtype": "float32"}, "bias": {"shape": [4], "dtype": "float32"},
            "running_mean": {"shape": [4], "dtype": "float32"}, "running_var": {"shape": [4], "dtype": "float32"},
            "num_batches_tracked": {"shape": [], "dtype": "int64"}}},
        "head": {"module_type": "Linear", "tensors": {
            "weight": {"shape": [5, 4], "dtype": "float32"}, "bias": {"shape": [5], "dtype": "float32"}}},
    }
    fresh = fresh_base(base_state)
    # the trained statistics and head differ from the base: the file has to carry them
    assert not torch.equal(fresh.block.bn.running_mean, net.block.bn.running_mean)
    assert not torch.equal(fresh.head.weight, net.head.weight)

    assert lk.load_adapters(fresh, str(tmp_path)) == [n for n, _ in lk.adapter_layers(net)]
    assert torch.equal(fresh(x), net(x))
    for key, value in net.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert fresh.block.bn.num_batches_tracked.item() == 3
    assert trainable_names(fresh) == trainable_names(net)
    assert {n for n, _ in lk.trainable.marked_modules(fresh)} == {"block.bn", "head"}


def test_adapters_alone_do_not_reproduce_the_trained_model(tmp_path):
    """The check above can fail: the adapter tensors alone give another model."""
    net, base_state = trained_net()
    lk.save_adapters(net, str(tmp_path))
    tensors = load_file(str(tensors_file(tmp_path)))
    save_file({k: v for k, v in tensors.items() if not k.startswith(("block.bn.", "head."))},
              str(tensors_file(tmp_path)))
    config = json.loads((tmp_path / CONFIG).read_text())
    config["trainable_modules"] = {}
    (tmp_path / CONFIG).write_text(json.dumps(config))
    fresh = fresh_base(base_state)
    lk.load_adapters(fresh, str(tmp_path))
    x = net_input(seed=9)
    assert (fresh(x) - net(x)).abs().max() > 1e-2


def test_version_1_files_still_load(tmp_path):
    net = make_net()
    base_state = copy.deepcopy(net.state_dict())
    lk.inject(net, "ssb")
    for i, (_, layer) in enumerate(lk.adapter_layers(net)):
        randomize_adapter(layer, i)
    lk.save_adapters(net, str(tmp_path))
    config = json.loads((tmp_path / CONFIG).read_text())
    del config["trainable_modules"], config["files"]
    config["format_version"] = 1
    tensors_file(tmp_path).rename(tmp_path / "adapters.safetensors")  # formats 1 and 2 had this one name
    (tmp_path / CONFIG).write_text(json.dumps(config))
    fresh = fresh_base(base_state)
    lk.load_adapters(fresh, str(tmp_path))
    x = net_input()
    assert torch.equal(fresh(x), net(x))


@pytest.fixture
def saved(tmp_path):
    net, base_state = trained_net(steps=1)
    lk.save_adapters(net, str(tmp_path))
    return tmp_path, base_state


def test_load_missing_trainable_module(saved):
    directory, base_state = saved
    model = fresh_base(base_state)
    del model.block.bn
    model.block.bn = nn.Identity()
    check_fails_unchanged(model, directory, r"trainable module 'block\.bn': a Identity in the model, a BatchNorm2d in the file")
    del model.block.bn
    check_fails_unchanged(model, directory, r"trainable module 'block\.bn': no such module in Net")


def test_load_trainable_module_with_other_state(saved):
    directory, base_state = saved
    model = fresh_base(base_state)
    model.block.bn = nn.BatchNorm2d(4, affine=False)
    check_fails_unchanged(model, directory, r"trainable module 'block\.bn': state keys differ: the model has \[\] that the file "
               r"lacks, the file has \['bias', 'weight'\]")
    model.block.bn = nn.BatchNorm2d(6)
    check_fails_unchanged(model, directory, r"tensor block\.bn\.weight has shape \[4\] in the file, expected \[6\]")


def test_load_trainable_module_the_model_adapts(saved):
    directory, base_state = saved
    model = fresh_base(base_state)
    lk.inject(model, "ssl", target_modules=["head"])
    check_fails_unchanged(model, directory, r"trainable module 'head': an adapter layer \(SSLLinear\) in the model; the file "
               r"trains it in full")
    config = json.loads((directory / CONFIG).read_text())
    config["trainable_modules"]["conv1"] = config["trainable_modules"].pop("head")
    (directory / CONFIG).write_text(json.dumps(config))
    check_fails_unchanged(fresh_base(base_state), directory, r"trainable module 'conv1': the file also adapts 'conv1'")


def test_load_trainable_module_tensor_problems(saved):
    directory, base_state = saved
    tensors = load_file(str(tensors_file(directory)))
    missing = {k: v for k, v in tensors.items() if k != "block.bn.running_var"}
    save_file(missing, str(tensors_file(directory)))
    check_fails_unchanged(fresh_base(base_state), directory, r"trainable module 'block\.bn': tensor block\.bn\.running_var "
               r"missing from the file")
    wrong = dict(tensors, **{"block.bn.num_batches_tracked": torch.tensor(1.5)})
    save_file(wrong, str(tensors_file(directory)))
    check_fails_unchanged(fresh_base(base_state), directory, r"tensor block\.bn\.num_batches_tracked is a floating tensor in "
               r"the file, the model's is torch\.int64")
    extra = dict(tensors, **{"block.bn.extra": torch.zeros(2)})
    save_file(extra, str(tensors_file(directory)))
    check_fails_unchanged(fresh_base(base_state), directory, r"tensor block\.bn\.extra in .*belongs to no adapter layer or "
               r"trainable module")


def test_merge_and_unload_leave_trainable_modules_alone():
    net, _ = trained_net(steps=1)
    x = net_input()
    y = net(x)
    head = net.head
    lk.unload(net, merge=True)
    assert net.head is head and head.weight.requires_grad
    torch.testing.assert_close(net(x), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("trained", [["head"], ["block"]], ids=["the-module", "a-module-around-it"])
def test_load_over_a_module_trained_in_full_is_refused_like_inject(tmp_path, trained):
    """A file that adapts a module the model trains in full (or one inside it) is refused, as inject
    refuses it, and the module keeps its trainable weights and its mark."""
    source = make_net()
    lk.inject(source, "liera", target_modules=["head", "block.conv1"], rank=2)
    lk.save_adapters(source, str(tmp_path))
    model = make_net()
    lk.inject(model, "ssl", target_modules=["seq.0"], trainable_modules=trained)
    owner, layer = trained[0], "head" if trained == ["head"] else "block.conv1"
    with pytest.raises(ValueError, match=rf"module '{layer}' trains in full \(trainable_modules: '{owner}'\)"):
        lk.inject(copy.deepcopy(model), "liera", target_modules=[layer])
    check_fails_unchanged(model, tmp_path, rf"layer '{layer}': trains in full in the model \(trainable_modules: "
                                           rf"'{owner}'\); it cannot also get an adapter", error=lk.AdapterFileError)
    assert {n for n, _ in lk.trainable.marked_modules(model)} == set(trained)
    assert all(p.requires_grad for p in model.get_submodule(owner).parameters())
