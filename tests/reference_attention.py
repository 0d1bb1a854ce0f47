"""The per-pixel formulation of WARN's attention (as first landed), kept as the reference the
pool-first modules in `models.attention` must equal: the full 3x3 convolution with K*(C+2) outputs
at every pixel, then the output heads and gates pooled through the masks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.attention import AttentionModule, GlobalGate, spatial_softmax


def attention_module(m: AttentionModule, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, _, h, w = z.shape
    k, c = m.heads, m.num_classes
    y = m.conv(z).flatten(2)  # (N, K*(C+2), h*w)
    att, out, gate = y.split([k, k * c, k], dim=1)
    mask = spatial_softmax(att)  # (N, K, hw)
    hyp = torch.einsum("nkcs,nks->nkc", out.reshape(n, k, c, h * w), mask)  # (N, K, C)
    logits = (gate * mask).sum(-1)
    gates = F.softmax(torch.tanh(logits) if m.squash else logits, dim=1)
    mixed = (gates.unsqueeze(-1) * F.log_softmax(hyp, dim=-1)).sum(1)
    return mask.reshape(n, k, h, w), gates, F.log_softmax(mixed, dim=-1)


def global_gate(g: GlobalGate, final: torch.Tensor) -> torch.Tensor:
    y = g.conv(final).flatten(2)
    att, gate = y.split([1, g.inputs], dim=1)
    mask = spatial_softmax(att)
    logits = (gate * mask).sum(-1)
    return F.softmax(torch.tanh(logits) if g.squash else logits, dim=1)
