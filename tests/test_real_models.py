"""Real model definitions, built without weights (nothing is downloaded): inject, train a step,
merge/unmerge, save/load with the modules trained in full, and the budget helper.

diffusers' UNet2DModel needs only torch (optional extra, installed in CI); torchvision and timm are
tested where they import (not beside the CPU torch wheel here: the tests skip and say why)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lrtensor_kernels as lk
from models import optional_import
from oracle import randomize_adapter, rel_err

pytestmark = pytest.mark.usefixtures("reference_backend")

METHODS = [("flora", {}), ("liera", dict(rank=4)), ("liera", dict(rank=2, mode="first_order", delta="tucker")),
           ("ssl", {}), ("ssb", {}), ("lora", dict(rank=4))]
METHOD_IDS = ["flora", "liera", "liera-tucker-first_order", "ssl", "ssb", "lora"]


def randomize_all(model, seed=0):
    for i, (_, layer) in enumerate(lk.adapter_layers(model)):
        randomize_adapter(layer, seed + i, std=0.05)


def check_model(make, inputs, loss_of, method, kwargs, tmp_path, trainable_modules=None):
    """The checks every real model gets; ``make()`` builds the same base model every call."""
    base = make().eval()
    with torch.no_grad():
        y_base = loss_of(base, inputs, raw=True)
    model = make()
    names = lk.inject(model, method, trainable_modules=trainable_modules, **kwargs)
    assert names and all(isinstance(model.get_submodule(n), lk.AdapterLayer) for n in names)
    model.eval()
    with torch.no_grad():  # fresh adapters compute the base model
        torch.testing.assert_close(loss_of(model, inputs, raw=True), y_base, rtol=1e-5, atol=1e-5)
    randomize_all(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trained, lr=1e-3)
    model.train()
    opt.zero_grad()
    loss_of(model, inputs).backward()
    assert all(p.grad is not None for p in trained)
    opt.step()
    model.eval()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen {n} changed"
    with torch.no_grad():
        y = loss_of(model, inputs, raw=True)
        assert rel_err(y, y_base) > 1e-5  # the adapters act
        lk.merge(model)
        torch.testing.assert_close(loss_of(model, inputs, raw=True), y, rtol=1e-4, atol=1e-5)
        lk.unmerge(model)
        assert torch.equal(loss_of(model, inputs, raw=True), y)
    lk.save_adapters(model, str(tmp_path))
    fresh = make().eval()
    assert lk.load_adapters(fresh, str(tmp_path)) == names
    with torch.no_grad():
        assert torch.equal(loss_of(fresh, inputs, raw=True), y)
    return model


# ----------------------------------------------------------------------------------------------
# diffusers UNet2DModel
# ----------------------------------------------------------------------------------------------
def small_unet():
    diffusers = optional_import("diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                                 attention_head_dim=8)


def unet_inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 3, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 3, 8, 8, generator=g)


def unet_loss(model, inputs, raw=False):
    x, t, noise = inputs
    out = model(x, t).sample
    return out if raw else F.mse_loss(out, noise)


@pytest.mark.parametrize("method, kwargs", METHODS, ids=METHOD_IDS)
def test_diffusers_unet(method, kwargs, tmp_path):
    small_unet()
    model = check_model(small_unet, unet_inputs(), unet_loss, method, kwargs, tmp_path,
                        trainable_modules=r".*norm.*" if method == "ssb" else None)
    adapted = {n for n, _ in lk.adapter_layers(model)}
    assert "conv_in" in adapted and "down_blocks.1.attentions.0.to_q" in adapted and "time_embedding.linear_1" in adapted
    if method == "ssb":  # the GroupNorms trained in full and saved
        marked = {n for n, _ in lk.trainable.marked_modules(model)}
        assert "mid_block.resnets.0.norm1" in marked and "conv_norm_out" in marked


def test_diffusers_unet_at_lora_budget():
    model = small_unet()
    targets = r".*(conv\d|to_[qkv])"
    plan = lk.ranks_for_budget(model, "flora", match_lora_rank=4, target_modules=targets)
    assert plan.total <= plan.budget
    plan.inject(model)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == plan.total
    unet_loss(model.train(), unet_inputs()).backward()


# ----------------------------------------------------------------------------------------------
# torchvision and timm (skipped where they do not import)
# ----------------------------------------------------------------------------------------------
def resnet18():
    models = optional_import("torchvision.models")
    torch.manual_seed(0)
    return models.resnet18(weights=None, num_classes=10)


def classifier_inputs(size=32):
    g = torch.Generator().manual_seed(4)
    return torch.randn(2, 3, size, size, generator=g), torch.tensor([1, 7])


def classifier_loss(model, inputs, raw=False):
    x, y = inputs
    out = model(x)
    return out if raw else F.cross_entropy(out, y)


@pytest.mark.parametrize("method, kwargs", METHODS[:2], ids=METHOD_IDS[:2])
def test_torchvision_resnet18_with_head_and_batchnorm_trained(method, kwargs, tmp_path):
    resnet18()
    model = check_model(resnet18, classifier_inputs(), classifier_loss, method, kwargs, tmp_path,
                        trainable_modules=r"fc|.*bn\d|.*downsample\.1")
    assert type(model.fc) is nn.Linear and model.fc.weight.requires_grad


def convnext_atto():
    timm = optional_import("timm")
    torch.manual_seed(0)
    return timm.create_model("convnext_atto", pretrained=False, num_classes=10)


@pytest.mark.parametrize("method, kwargs", METHODS[:2], ids=METHOD_IDS[:2])
def test_timm_convnext_atto(method, kwargs, tmp_path):
    convnext_atto()
    check_model(convnext_atto, classifier_inputs(), classifier_loss, method, kwargs, tmp_path,
                trainable_modules=["head"])


def test_timm_convnext_atto_at_lora_budget():
    model = convnext_atto()
    plan = lk.ranks_for_budget(model, "flora", match_lora_rank=8, trainable_modules=["head"])
    assert plan.total <= plan.budget
    plan.inject(model)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == plan.total
