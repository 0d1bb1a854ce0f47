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

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn


def spatial_softmax(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the flattened spatial axis of (N, K, S)."""
    return F.softmax(x, dim=-1)


def pool_patches(z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mask-weighted sums of Z's 3x3 neighbourhoods (zero-padded, as a padding-1 convolution sees them).

    z: (N, C_in, h, w); mask: (N, K, h, w). Returns (N, K, 9*C_in), ordered (ky, kx, c) like
    `patch_rows`, so `pooled @ patch_rows(weight).T` equals the mask-weighted sum of that convolution's
    output.

    Rather than shifting Z nine times, the mask is: sum_s H(s) Z(s + d - 1) = sum_t Z(t) H(t - d + 1),
    and a single matrix product pools Z through all nine shifted masks (`shifted_masks`). The shifted
    masks are its left operand: onnxruntime runs (9K x hw) @ (hw x C_in) 1.8x faster than
    (C_in x hw) @ (hw x 9K).
    """
    n, cin = z.shape[:2]
    k = mask.shape[1]
    pooled = shifted_masks(mask) @ z.flatten(2).transpose(1, 2)  # (N, K*9, C_in)
    return pooled.reshape(n, k, 9 * cin)


def shifted_masks(mask: torch.Tensor) -> torch.Tensor:
    """(N, K, h, w) masks to (N, K*9, h*w): channel k*9 + d, d = ky*3 + kx, holds H_k(t - (ky-1, kx-1)), 0 outside.

    PyTorch slices the zero-padded masks: no arithmetic, and 1.7-1.8x faster than a convolution in
    training. The export shifts them by a grouped convolution with one-hot kernels instead, which
    onnxruntime runs faster than a Pad and nine Slices (docs/performance.md, "Pool-first attention").
    """
    n, k, h, w = mask.shape
    if torch.onnx.is_in_onnx_export():
        # Kernel d is one-hot at (2-ky, 2-kx): a convolution reads its input at t + (u - 1) for tap u
        onehot = torch.eye(9, dtype=mask.dtype, device=mask.device).reshape(9, 1, 3, 3).flip(-2, -1)
        return F.conv2d(mask, onehot.repeat(k, 1, 1, 1), padding=1, groups=k).flatten(2)
    padded = F.pad(mask, (1, 1, 1, 1))
    taps = [padded[:, :, 2 - ky : 2 - ky + h, 2 - kx : 2 - kx + w] for ky in range(3) for kx in range(3)]
    return torch.stack(taps, 2).reshape(n, k * 9, h * w)


def patch_rows(weight: torch.Tensor) -> torch.Tensor:
    """A 3x3 convolution weight (O, C_in, 3, 3) as rows over (ky, kx, c_in): (O, 9*C_in), `pool_patches`' order."""
    return weight.permute(0, 2, 3, 1).flatten(1)


MASK_FORMS = ("conv", "taps", "rows")


def mask_logits(z: torch.Tensor, weight: torch.Tensor, form: str = "conv") -> torch.Tensor:
    """The mask logits: Z convolved by the 3x3 `weight` (K, C_in, 3, 3), zero padding 1. (N, K, h, w).

    `form` orders the same sums. "conv" is one convolution, fastest in eager PyTorch. onnxruntime's
    CPU convolutions fill output channels in blocks of 8 or 16, so there a 3x3 convolution with K=4
    outputs costs what one with 16 does; the export's two forms fill their blocks:
    - "taps": a 1x1 projection onto the 9K kernel taps, a depthwise one-hot 3x3 convolution that
      shifts each tap to its place, and a 1x1 convolution that sums each head's nine;
    - "rows": the same with the 3K kernel rows (1x3, then a 3x1 shift), padded with zero rows to 16
      channels, below which onnxruntime leaves its blocked layout. Its intermediates are a third as
      large, for the full-resolution layer.
    """
    if form == "conv":
        return F.conv2d(z, weight, padding=1)
    k, cin = weight.shape[:2]
    eye = partial(torch.eye, dtype=z.dtype, device=z.device)
    if form == "taps":
        parts, kernel, onehot_shape = patch_rows(weight).reshape(k * 9, cin, 1, 1), 9, (3, 3)
    elif form == "rows":
        parts, kernel, onehot_shape = weight.permute(0, 2, 1, 3).reshape(k * 3, cin, 1, 3), 3, (3, 1)
    else:
        raise ValueError(f"form must be one of {', '.join(MASK_FORMS)}, got {form!r}")
    used = k * kernel  # part j = k*kernel + i, shifted by its i-th one-hot kernel
    channels = max(used, 16) if form == "rows" else used
    parts = F.pad(parts, (0, 0, 0, 0, 0, 0, 0, channels - used))
    onehot = F.pad(eye(kernel).repeat(k, 1).reshape(used, 1, *onehot_shape), (0, 0, 0, 0, 0, 0, 0, channels - used))
    total = F.pad(eye(k).repeat_interleave(kernel, dim=1), (0, channels - used)).reshape(k, channels, 1, 1)
    projected = F.conv2d(z, parts, padding=(0, parts.shape[-1] // 2))
    moved = F.conv2d(projected, onehot, padding=(1, onehot_shape[1] // 2), groups=channels)
    return F.conv2d(moved, total)


def attend(z: torch.Tensor, weight: torch.Tensor, heads: int, form: str = "conv") -> tuple[torch.Tensor, torch.Tensor]:
    """K spatial-softmax masks from the first `heads` output channels of a 3x3 `weight`, and Z pooled through them.

    Returns the masks (N, K, h, w), each summing to 1 over space, and `pool_patches(z, masks)`.
    `form`: how `mask_logits` orders its sums.
    """
    n, _, h, w = z.shape
    logits = mask_logits(z, weight[:heads], form)  # (N, K, h, w)
    mask = spatial_softmax(logits.flatten(2)).reshape(n, heads, h, w)
    return mask, pool_patches(z, mask)


@contextmanager
def mask_forms(forms: dict[nn.Module, str]) -> Iterator[None]:
    """Within the block, these attention modules (or global gate) compute their mask logits in these forms."""
    saved = {m: m.mask_form for m in forms}
    for m, form in forms.items():
        m.mask_form = form
    try:
        yield
    finally:
        for m, form in saved.items():
            m.mask_form = form


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
        self.mask_form = "conv"  # see mask_logits; the export picks another (mask_forms)
        # Output channels [K attention | K*C output heads (head-major) | K gates], 3x3, no bias.
        self.conv = nn.Conv2d(in_planes, heads * (num_classes + 2), 3, 1, 1, bias=False)

    def head_weights(self) -> torch.Tensor:
        """Output-head and gate weights per head, as rows over (ky, kx, c_in): (K, C+1, 9*C_in)."""
        k, c = self.heads, self.num_classes
        w = patch_rows(self.conv.weight)  # (K*(C+2), 9*C_in)
        # Slices rather than split(): the exporter then folds this whole chain into one initializer.
        out, gate = w[k : k + k * c].reshape(k, c, -1), w[k + k * c :].reshape(k, 1, -1)
        return torch.cat([out, gate], dim=1)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (masks (N, K, h, w), gates (N, K), layer log-probabilities (N, C))."""
        c = self.num_classes
        mask, pooled = attend(z, self.conv.weight, self.heads, self.mask_form)  # (N, K, h, w), (N, K, 9*C_in)
        # One (N x 9C_in) @ (9C_in x C+1) product per head: onnxruntime ran the (N, K, 1, 9C_in) form
        # as N*K vector products, 2.4x slower
        y = (pooled.transpose(0, 1) @ self.head_weights().transpose(1, 2)).transpose(0, 1)  # (N, K, C+1)
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
        self.mask_form = "conv"
        self.conv = nn.Conv2d(in_planes, 1 + inputs, 3, 1, 1, bias=False)

    def forward(self, final: torch.Tensor) -> torch.Tensor:
        _, pooled = attend(final, self.conv.weight, 1, self.mask_form)  # (N, 1, 9*C_in)
        gate = pooled[:, 0] @ patch_rows(self.conv.weight[1:]).T  # (N, L+1)
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
