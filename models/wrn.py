"""Pre-activation Wide-ResNet for small images (Zagoruyko & Komodakis, 2016): WRN-d-k."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3, (dropout), BN-ReLU-conv3x3, plus shortcut.

    Args:
        in_planes: input channels.
        out_planes: output channels.
        stride: stride of the first convolution (and of the 1x1 shortcut when shapes change).
        dropout: dropout probability between the two convolutions.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.dropout = dropout
        self.shortcut = None
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        # The projection shortcut reads the activated input, as in the reference WRN.
        skip = x if self.shortcut is None else self.shortcut(o)
        y = self.conv1(o)
        y = F.relu(self.bn2(y))
        if self.dropout > 0:
            y = F.dropout(y, p=self.dropout, training=self.training)
        return self.conv2(y) + skip


def make_stage(in_planes: int, out_planes: int, blocks: int, stride: int, dropout: float) -> nn.Sequential:
    layers = [BasicBlock(in_planes, out_planes, stride, dropout)]
    layers += [BasicBlock(out_planes, out_planes, 1, dropout) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class WideResNet(nn.Module):
    """CIFAR-style WRN-depth-width with three stages of strides 1, 2, 2.

    `forward_features` returns every stage's output (shallowest first), which is where
    attention modules attach; `forward_head` turns the last one into class logits.
    """

    def __init__(self, depth: int, width: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4 (10, 16, 22, 28, ...), got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.stage_channels = widths[1:]
        self.stage_strides = [1, 2, 4]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.stages = nn.ModuleList(
            [make_stage(widths[i], widths[i + 1], n, 1 if i == 0 else 2, dropout) for i in range(3)]
        )
        self.bn = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def last_layer(self) -> nn.Linear:
        return self.fc

    def last_stage(self) -> nn.Module:
        return self.stages[-1]

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.conv1(x)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)  # (N, C_i, H / stride_i, W / stride_i)
        return feats

    def final_features(self, last: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(last))

    def forward_head(self, final: torch.Tensor) -> torch.Tensor:
        return self.fc(final.mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.final_features(self.forward_features(x)[-1]))
