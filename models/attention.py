"""Attention modules of WARN (Rodríguez et al., "Attend and Rectify", ECCV 2018).

Symbols follow the paper: Z is an attended feature map, H its attention heads (spatial
softmax masks), O its output heads, g its gates. K is the attention width (heads per layer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def spatial_softmax(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the flattened spatial axis of (N, K, S)."""
    return F.softmax(x, dim=-1)


class AttentionModule(nn.Module):
    """One attended layer: K attention heads, K output heads and the layer gate.

    The three 3x3 convolutions W_H, W_O and W_g read the same Z, so they are stored as one
    convolution whose output channels are split as [K | K*C | K]; the maths is unchanged.

    Args:
        in_planes: channels of the attended feature map Z.
        num_classes: C, the number of classes.
        heads: K, the attention width.
    """

    def __init__(self, in_planes: int, num_classes: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.num_classes = num_classes
        self.conv = nn.Conv2d(in_planes, heads * (num_classes + 2), 3, 1, 1, bias=False)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (masks (N, K, h, w), gates (N, K), layer log-probabilities (N, C))."""
        n, _, h, w = z.shape
        k, c = self.heads, self.num_classes
        y = self.conv(z).flatten(2)  # (N, K*(C+2), h*w)
        att, out, gate = y.split([k, k * c, k], dim=1)
        mask = spatial_softmax(att)  # H: (N, K, hw), sums to 1 over hw
        hyp = torch.einsum("nkcs,nks->nkc", out.reshape(n, k, c, h * w), mask)  # o_k: (N, K, C)
        gates = F.softmax(torch.tanh((gate * mask).sum(-1)), dim=1)  # g: (N, K)
        mixed = (gates.unsqueeze(-1) * F.log_softmax(hyp, dim=-1)).sum(1)  # (N, C)
        return mask.reshape(n, k, h, w), gates, F.log_softmax(mixed, dim=-1)


class GlobalGate(nn.Module):
    """Weighs the L attended layers' hypotheses and the backbone's own output.

    One attention head on the last feature map pools a gate convolution with L+1 outputs;
    tanh and a softmax over the L+1 inputs give g_O.

    Args:
        in_planes: channels of the last feature map.
        inputs: L+1, the number of hypotheses to weigh.
    """

    def __init__(self, in_planes: int, inputs: int) -> None:
        super().__init__()
        self.inputs = inputs
        self.conv = nn.Conv2d(in_planes, 1 + inputs, 3, 1, 1, bias=False)

    def forward(self, final: torch.Tensor) -> torch.Tensor:
        y = self.conv(final).flatten(2)  # (N, 1+L+1, hw)
        att, gate = y.split([1, self.inputs], dim=1)
        mask = spatial_softmax(att)  # (N, 1, hw)
        return F.softmax(torch.tanh((gate * mask).sum(-1)), dim=1)  # g_O: (N, L+1)


def head_overlap(masks: torch.Tensor) -> torch.Tensor:
    """The authors' regularizer: mean squared off-diagonal entry of M·Mᵀ for one layer.

    M holds each head's mask, 2x2 average-pooled and flattened: (N, K, S). Zero when the
    heads have disjoint support, positive when they overlap; zero for K=1.
    """
    n, k, h, w = masks.shape
    if k < 2:
        return masks.new_zeros(())
    if h >= 2 and w >= 2:
        masks = F.avg_pool2d(masks, 2)
    m = masks.flatten(2)  # (N, K, S)
    gram = m @ m.transpose(1, 2)  # (N, K, K)
    off = ~torch.eye(k, dtype=torch.bool, device=masks.device)
    return gram[:, off].pow(2).mean()
