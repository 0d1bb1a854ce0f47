"""Attention modules of WARN (Rodríguez et al., "Attend and Rectify", ECCV 2018).

Symbols follow the paper: Z is an attended feature map, H its attention heads (spatial softmax
masks), O its output heads, g its gates. K is the attention width (heads per layer).

Pool first. The output heads and the gate are 3x3 convolutions of Z, read only through
mask-weighted sums over space. Both are linear in Z, so

    sum_s H_k(s) (W * Z)(s) = W . sum_s H_k(s) patch3x3(Z)(s)

and the module pools Z's 3x3 neighbourhoods through each mask first (K x C_in x 9 numbers per
image), then applies the output-head and gate weights as one small matrix product. Only the K mask
logits are computed per pixel, so no tensor grows with classes x resolution. The parameters are
the per-pixel formulation's, unchanged: one 3x3 convolution whose output channels are [K | K*C | K].
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


def spatial_softmax(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the flattened spatial axis of (N, K, S)."""
    return F.softmax(x, dim=-1)


def pool_patches(z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mask-weighted sums of Z's 3x3 neighbourhoods (zero-padded, as a padding-1 convolution sees them).

    z: (N, C_in, h, w); mask: (N, K, h, w). Returns (N, K, C_in*9), ordered like a flattened 3x3
    convolution weight (c, ky, kx), so `pooled @ weight.reshape(out, -1).T` equals the mask-weighted
    sum of that convolution's output.

    Rather than shifting Z nine times, the mask is: sum_s H(s) Z(s + d - 1) = sum_t Z(t) H(t - d + 1).
    The nine shifted copies come from one grouped convolution with one-hot kernels (faster in
    onnxruntime than nine slices), and a single matrix product pools Z through all of them.
    """
    n, cin, h, w = z.shape
    k = mask.shape[1]
    # Kernel d = ky*3 + kx is one-hot at (2-ky, 2-kx), so output channel k*9 + d holds H(t - d + 1).
    onehot = torch.eye(9, dtype=mask.dtype, device=mask.device).reshape(9, 1, 3, 3).flip(-2, -1)
    shifted = F.conv2d(mask, onehot.repeat(k, 1, 1, 1), padding=1, groups=k)  # (N, K*9, h, w)
    pooled = z.flatten(2) @ shifted.flatten(2).transpose(1, 2)  # (N, C_in, K*9)
    return pooled.reshape(n, cin, k, 9).permute(0, 2, 1, 3).reshape(n, k, cin * 9)


def mask_logits(z: torch.Tensor, weight: torch.Tensor, separable: bool = False) -> torch.Tensor:
    """The mask logits: Z convolved by the 3x3 `weight` (K, C_in, 3, 3), zero padding 1. (N, K, h, w).

    `separable`: the same sums in another order, for export. Each of the 9 kernel taps becomes a 1x1
    projection (9K channels), a depthwise one-hot 3x3 convolution shifts each to its tap, and a 1x1
    convolution sums each head's nine. onnxruntime's CPU convolutions fill output channels in blocks
    of 8 or 16, so a 3x3 convolution with K=4 outputs costs what one with 16 does; the 9K-channel
    1x1 projection fills its blocks. In eager PyTorch, training included, the plain convolution is faster.
    """
    if not separable:
        return F.conv2d(z, weight, padding=1)
    k, cin = weight.shape[:2]
    taps = weight.permute(0, 2, 3, 1).reshape(k * 9, cin, 1, 1)  # channel k*9 + ky*3 + kx
    shift = torch.eye(9, dtype=z.dtype, device=z.device).reshape(9, 1, 3, 3).repeat(k, 1, 1, 1)
    shifted = F.conv2d(F.conv2d(z, taps), shift, padding=1, groups=k * 9)  # tap (ky, kx) read at t + (ky-1, kx-1)
    total = torch.eye(k, dtype=z.dtype, device=z.device).repeat_interleave(9, dim=1).reshape(k, k * 9, 1, 1)
    return F.conv2d(shifted, total)


def attend(
    z: torch.Tensor, weight: torch.Tensor, heads: int, separable: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """K spatial-softmax masks from the first `heads` output channels of a 3x3 `weight`, and Z pooled through them.

    Returns the masks (N, K, h, w), each summing to 1 over space, and `pool_patches(z, masks)`.
    `separable` picks `mask_logits`' export form.
    """
    n, _, h, w = z.shape
    logits = mask_logits(z, weight[:heads], separable)  # (N, K, h, w)
    mask = spatial_softmax(logits.flatten(2)).reshape(n, heads, h, w)
    return mask, pool_patches(z, mask)


@contextmanager
def separable_masks(modules: Iterable[nn.Module | None]) -> Iterator[None]:
    """Within the block, these attention modules (and global gate) compute their mask logits in the separable form."""
    saved = {m: m.separable for m in modules if m is not None}
    for m in saved:
        m.separable = True
    try:
        yield
    finally:
        for m, value in saved.items():
            m.separable = value


class AttentionModule(nn.Module):
    """One attended layer: K attention heads, K output heads and the layer gate.

    Args:
        in_planes: channels of the attended feature map Z.
        num_classes: C, the number of classes.
        heads: K, the attention width.
        squash: tanh on the gate logits before their softmax, as in the paper.
    """

    def __init__(self, in_planes: int, num_classes: int, heads: int, squash: bool = True) -> None:
        super().__init__()
        self.heads = heads
        self.num_classes = num_classes
        self.squash = squash  # the paper's tanh on the gate logits (see WARNConfig.gate_tanh)
        self.separable = False  # mask_logits' export form (see separable_masks)
        # Output channels [K attention | K*C output heads (head-major) | K gates], 3x3, no bias.
        self.conv = nn.Conv2d(in_planes, heads * (num_classes + 2), 3, 1, 1, bias=False)

    def head_weights(self) -> torch.Tensor:
        """Output-head and gate weights per head, as rows over (c_in, ky, kx): (K, C+1, C_in*9)."""
        k, c = self.heads, self.num_classes
        w = self.conv.weight.flatten(1)  # (K*(C+2), C_in*9)
        # Slices rather than split(): the exporter then folds this whole chain into one initializer.
        out, gate = w[k : k + k * c].reshape(k, c, -1), w[k + k * c :].reshape(k, 1, -1)
        return torch.cat([out, gate], dim=1)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (masks (N, K, h, w), gates (N, K), layer log-probabilities (N, C))."""
        c = self.num_classes
        mask, pooled = attend(z, self.conv.weight, self.heads, self.separable)  # (N, K, h, w), (N, K, C_in*9)
        y = (pooled.unsqueeze(2) @ self.head_weights().transpose(1, 2)).squeeze(2)  # (N, K, C+1)
        hyp, gate = y.split([c, 1], dim=-1)  # o_k: (N, K, C); pooled gate logit: (N, K, 1)
        logits = gate.squeeze(-1)
        gates = F.softmax(torch.tanh(logits) if self.squash else logits, dim=1)  # g: (N, K)
        mixed = (gates.unsqueeze(-1) * F.log_softmax(hyp, dim=-1)).sum(1)  # (N, C)
        return mask, gates, F.log_softmax(mixed, dim=-1)


class GlobalGate(nn.Module):
    """Weighs the L attended layers' hypotheses and the backbone's own output.

    One attention head on the last feature map pools a gate convolution with L+1 outputs (pooled
    first, as in AttentionModule); tanh and a softmax over the L+1 inputs give g_O.

    Args:
        in_planes: channels of the last feature map.
        inputs: L+1, the number of hypotheses to weigh.
        squash: tanh on the gate logits before their softmax, as in the paper.
    """

    def __init__(self, in_planes: int, inputs: int, squash: bool = True) -> None:
        super().__init__()
        self.inputs = inputs
        self.squash = squash
        self.separable = False
        self.conv = nn.Conv2d(in_planes, 1 + inputs, 3, 1, 1, bias=False)

    def forward(self, final: torch.Tensor) -> torch.Tensor:
        _, pooled = attend(final, self.conv.weight, 1, self.separable)  # (N, 1, C_in*9)
        gate = pooled[:, 0] @ self.conv.weight[1:].flatten(1).T  # (N, L+1)
        return F.softmax(torch.tanh(gate) if self.squash else gate, dim=1)  # g_O: (N, L+1)


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
