"""A small model mixing Conv1d/2d/3d, Linear, BatchNorm and MultiheadAttention, for the surgery tests."""
import torch
from torch import nn


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
