"""A small model mixing Conv1d/2d/3d, Linear, BatchNorm and MultiheadAttention, for the surgery tests;
the layers of torchvision's resnet18 and timm's convnext_atto, for torch builds where those do not import."""
import importlib

import pytest
import torch
from torch import nn


def optional_import(name: str):
    """The module, or a skip naming why it does not import (a wrong torch build raises more than ImportError)."""
    try:
        return importlib.import_module(name)
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"{name} does not import here: {type(err).__name__}: {err}")


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, groups=2, padding_mode="replicate")

    def forward(self, x):
        return self.conv2(self.act(self.bn(self.conv1(x))))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Conv3d(1, 3, (2, 1, 1))
        self.block = Block()
        self.conv1 = nn.Conv2d(4, 4, 1)
        self.seq = nn.Sequential(nn.Conv1d(4, 4, 3, padding=1, padding_mode="reflect"), nn.ReLU())
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 5)

    def forward(self, x):  # x: (N, 1, 2, 5, 5)
        h = self.pre(x).squeeze(2)
        h = self.conv1(self.block(h))
        h = self.seq(h.flatten(2)).transpose(1, 2)
        h = self.attn(h, h, h, need_weights=False)[0]
        return self.head(h.mean(1))


def make_net(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    net = Net().to(dtype)
    # non-trivial BatchNorm statistics so eval mode is not the identity
    with torch.no_grad():
        net.block.bn.running_mean.uniform_(-0.5, 0.5)
        net.block.bn.running_var.uniform_(0.5, 1.5)
    return net.eval()


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock, written out (torchvision does not import beside the CPU wheel)."""

    def __init__(self, in_ch, out_ch, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet18(nn.Module):
    """The convolutions, norms and classifier of torchvision's resnet18, same shapes and names."""

    def __init__(self, num_classes=1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths = [64, 128, 256, 512]
        layers, in_ch = [], 64
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock(in_ch, width, stride), BasicBlock(width, width)))
            in_ch = width
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an (N, C, H, W) tensor, as timm's."""

    def forward(self, x):
        x = nn.functional.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim, layer_scale=0.5):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = LayerNorm2d(dim)
        self.mlp = ConvMlp(dim, 4 * dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x):
        return x + self.mlp(self.norm(self.conv_dw(x))) * self.gamma.reshape(1, -1, 1, 1)


class ConvNeXtAtto(nn.Module):
    """The layers of timm's convnext_atto (conv_mlp: 1x1 convs in the blocks), same shapes and
    names; its layer scale starts at 0.5 here (timm's 1e-6 would leave the blocks' adapters with
    gradients at rounding level)."""

    def __init__(self, num_classes=1000, dims=(40, 80, 160, 320), depths=(2, 2, 6, 2)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0]))
        stages, in_dim = [], dims[0]
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            stage = nn.Module()
            stage.downsample = nn.Identity() if i == 0 else nn.Sequential(LayerNorm2d(in_dim),
                                                                           nn.Conv2d(in_dim, dim, 2, 2))
            stage.blocks = nn.Sequential(*[ConvNeXtBlock(dim) for _ in range(depth)])
            stages.append(stage)
            in_dim = dim
        self.stages = nn.ModuleList(stages)
        self.head = nn.Module()
        self.head.norm = LayerNorm2d(dims[-1])
        self.head.fc = nn.Linear(dims[-1], num_classes)

    def forward(self, x):
        x = self.stem(x)
        for stage in self.stages:
            x = stage.blocks(stage.downsample(x))
        return self.head.fc(self.head.norm(x.mean((2, 3), keepdim=True)).flatten(1))
