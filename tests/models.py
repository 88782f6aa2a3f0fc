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
