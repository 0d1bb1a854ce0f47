"""WARN: a Wide-ResNet with gated attention modules on its last `attention_depth` stages."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
import tyro
from torch import nn

from models.attention import AttentionModule, GlobalGate, head_overlap
from models.backbones import BACKBONES, build_backbone

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Architecture:
    """The network a user chooses: warn-train's model flags are these fields (tyro reads the docstrings)."""

    backbone: Literal[tuple(BACKBONES)] = "wrn"  # type: ignore[valid-type]
    """wrn: the CIFAR-style Wide-ResNet (from scratch); or a torchvision classifier to attach attention to"""
    depth: int = 16
    """Wide-ResNet depth, 6n+4 (wrn only)"""
    width: int = 2
    """Wide-ResNet widening factor (wrn only)"""
    attention_depth: Annotated[int, tyro.conf.arg(aliases=["--ad"])] = 3
    """AD: attended stages, the deepest first (0 is the plain backbone; up to 3 for wrn, 4 for torchvision)"""
    attention_width: Annotated[int, tyro.conf.arg(aliases=["--aw"])] = 4
    """AW: K, attention heads per attended stage"""
    dropout: float = 0.0
    """dropout inside the residual blocks (wrn only)"""
    reg_weight: float = 1e-3
    """weight of the regularizer that keeps a layer's heads apart"""
    # without it the global gate can settle on the backbone alone early in training; the attended
    # layers then get almost no gradient and their maps stop meaning anything (README: "Gates that say something")
    aux_weight: float = 0.0
    """weight of each attended layer's own classification loss, added to the final output's (0: the paper's loss)"""
    # softmax gates drift to one-hot (one head, one layer for every image) as their logits grow; this
    # keeps the logits where the softmax still responds to the image (z-loss, as MoE routers use)
    gate_decay: float = 0.0
    """weight of a penalty on the gates' logits, centred (their spread): keeps gates from saturating"""
    # tanh caps any two gates' ratio at e^2; a model that wants more drives its logits far past +-1, where
    # tanh is flat and the gates stop depending on the image (README: "Gates that say something")
    gate_tanh: bool = True
    """the paper's softmax(tanh(logits)) gates; --no-gate-tanh: softmax(logits), free to vary per image"""


@dataclass
class WARNConfig(Architecture):
    """Everything needed to rebuild the network; saved (as JSON-able data) with the checkpoint."""

    num_classes: int = 10
    input_size: tuple[int, int] = (48, 48)  # (H, W) the model is trained at
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)
    class_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        stages = 3 if self.backbone == "wrn" else 4
        if not 0 <= self.attention_depth <= stages:
            raise ValueError(f"attention_depth must be 0..{stages} ({self.backbone} has {stages} stages)")
        if self.attention_width < 1:
            raise ValueError(f"attention_width must be >= 1, got {self.attention_width}")
        for name in ("reg_weight", "aux_weight", "gate_decay"):
            if not getattr(self, name) >= 0:  # NaN included: it would silently poison every step
                raise ValueError(f"{name} must be a number >= 0, got {getattr(self, name)}")
        self.input_size = tuple(self.input_size)  # type: ignore[assignment]
        self.mean = tuple(self.mean)  # type: ignore[assignment]
        self.std = tuple(self.std)  # type: ignore[assignment]
        if not self.class_names:
            self.class_names = [str(i) for i in range(self.num_classes)]
        if len(self.class_names) != self.num_classes:
            raise ValueError("class_names must have num_classes entries")

    @property
    def name(self) -> str:
        net = f"{self.depth}-{self.width}" if self.backbone == "wrn" else self.backbone
        return f"warn-{net}-ad{self.attention_depth}-aw{self.attention_width}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(input_size=list(self.input_size), mean=list(self.mean), std=list(self.std))
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WARNConfig:
        return cls(**d)  # checkpoints from before `backbone` existed get its default, "wrn"


class WARNOutput(NamedTuple):
    """The structured result of a forward pass.

    Layers are ordered shallowest first; in `layer_log_probabilities` and `global_gates`
    the backbone's own output comes last (index L).
    """

    log_probabilities: torch.Tensor  # (N, C), final, globally gated
    probabilities: torch.Tensor  # (N, C), exp of the above, sums to 1
    attention: tuple[torch.Tensor, ...]  # L x (N, K, h_l, w_l), each head sums to 1 over space
    gates: tuple[torch.Tensor, ...]  # L x (N, K), layer gates, sum to 1
    layer_log_probabilities: torch.Tensor  # (N, L+1, C)
    global_gates: torch.Tensor  # (N, L+1), sum to 1
    attention_maps: tuple[torch.Tensor, ...]  # L x (N, h_l, w_l), each layer's heads mixed by its gates
    combined_attention: torch.Tensor | None  # (N, h_L, w_L) on the coarsest attended grid; None if L=0


class WARN(nn.Module):
    """Wide Attention Residual Network. Input: RGB in [0, 1], (N, 3, H, W); it normalizes itself."""

    def __init__(self, config: WARNConfig, pretrained: bool = False, weights_file: str | Path | None = None) -> None:
        """`pretrained` / `weights_file` start a torchvision backbone from ImageNet weights (training only:
        a checkpoint holds every weight)."""
        super().__init__()
        self.config = config
        self.backbone = build_backbone(
            config.backbone, config.num_classes, config.depth, config.width, config.dropout, pretrained, weights_file
        )
        ad, stages = config.attention_depth, len(self.backbone.stage_channels)
        self.attended = list(range(stages - ad, stages))  # stage indices, shallowest first
        self.attention = nn.ModuleList(
            AttentionModule(
                self.backbone.stage_channels[i], config.num_classes, config.attention_width, config.gate_tanh
            )
            for i in self.attended
        )
        self.global_gate = GlobalGate(self.backbone.stage_channels[-1], ad + 1, config.gate_tanh) if ad else None
        self.register_buffer("mean", torch.tensor(config.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(1, 3, 1, 1), persistent=False)

    @property
    def strides(self) -> list[int]:
        """Stride of each attended layer's mask relative to the input."""
        return [self.backbone.stage_strides[i] for i in self.attended]

    def forward(self, x: torch.Tensor) -> WARNOutput:
        x = (x - self.mean) / self.std
        feats = self.backbone.forward_features(x)
        final = self.backbone.final_features(feats[-1])
        net = F.log_softmax(self.backbone.forward_head(final), dim=-1)  # (N, C)
        if self.global_gate is None:
            ones = net.new_ones(net.shape[0], 1)
            return WARNOutput(net, net.exp(), (), (), net.unsqueeze(1), ones, (), None)
        masks, gates, hyps = zip(*(m(feats[i]) for m, i in zip(self.attention, self.attended)))
        # onnxruntime orders execution by a depth-first walk from the outputs that follows the input added
        # to the graph last first. Adding the shallowest layer's row last runs each attention module as
        # soon as its stage is done, so the full-resolution stage is not held through the rest of the
        # backbone (peak memory of a 1000-class 112x112 WRN-16-4: 1.39x its backbone's before, 1.26x after).
        rows = [h.unsqueeze(1) for h in reversed([*hyps, net])]
        layers = torch.cat(rows[::-1], dim=1)  # (N, L+1, C)
        g = self.global_gate(final)  # (N, L+1)
        # The gated sum of log-probabilities is renormalized so exp() is a distribution.
        logp = F.log_softmax((g.unsqueeze(-1) * layers).sum(1), dim=-1)
        maps = tuple(mix_heads(m, gt) for m, gt in zip(masks, gates))
        return WARNOutput(logp, logp.exp(), masks, gates, layers, g, maps, combine_layers(maps, g))

    def loss(self, out: WARNOutput, target: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood, the attended layers' own (weighted by `aux_weight`), the gates' spread
        (weighted by `gate_decay`) and the weighted head-overlap regularizer."""
        loss = F.nll_loss(out.log_probabilities, target)
        if not out.attention:
            return loss
        if self.config.aux_weight:
            layers = out.layer_log_probabilities[:, :-1]  # (N, L, C), the backbone's own output left out
            aux = F.nll_loss(layers.flatten(0, 1), target.repeat_interleave(layers.shape[1]))
            loss = loss + self.config.aux_weight * aux
        if self.config.gate_decay:
            loss = loss + self.config.gate_decay * sum(gate_spread(g) for g in (*out.gates, out.global_gates))
        if self.config.reg_weight:
            loss = loss + self.config.reg_weight * sum(head_overlap(m) for m in out.attention)
        return loss


def plain_backbone(model: WARN) -> WARN:
    """The same network with AD=0 (no attention modules), holding a copy of `model`'s backbone weights."""
    plain = WARN(WARNConfig(**{**model.config.to_dict(), "attention_depth": 0}))
    plain.backbone.load_state_dict(model.backbone.state_dict())
    return plain.eval()


def gate_spread(gates: torch.Tensor) -> torch.Tensor:
    """Mean squared centred log-gate of (N, G) softmax gates: the centred logits' spread, whatever their shift."""
    log_gates = gates.clamp_min(1e-30).log()
    return (log_gates - log_gates.mean(1, keepdim=True)).pow(2).mean()


def mix_heads(mask: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """A layer's heads (N, K, h, w) mixed by its layer gates (N, K): (N, h, w), summing to 1."""
    # one product: a Mul and a ReduceSum took 3x as long in onnxruntime, through an (N, K, h, w) temporary
    return (gates.unsqueeze(1) @ mask.flatten(2)).reshape(mask.shape[0], *mask.shape[2:])


def combine_layers(maps: tuple[torch.Tensor, ...], global_gates: torch.Tensor) -> torch.Tensor:
    """The layers' maps (L x (N, h_l, w_l)) mixed by their global gates, on the coarsest grid: (N, h_L, w_L).

    A map's value is attention mass per cell, so finer maps are first summed into the coarsest
    attended grid: layers are then compared as mass per region of the same size (mixing per-pixel
    densities would let the finest layer's single-cell peaks win). The backbone's gate is left out
    and the rest renormalized, so the result sums to 1.
    """
    grid = maps[-1].shape[-2:]  # the deepest attended layer is the coarsest
    mass = [
        F.adaptive_avg_pool2d(m[:, None], grid)[:, 0] * (m.shape[-2] * m.shape[-1] / (grid[0] * grid[1])) for m in maps
    ]  # L x (N, h_L, w_L), each still summing to 1
    w = global_gates[:, :-1]
    w = w / w.sum(1, keepdim=True)  # (N, L)
    return (w[:, :, None, None] * torch.stack(mass, 1)).sum(1)


def upsample(grid_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, h, w) to (N, H, W), bilinear, renormalized to sum to 1."""
    up = F.interpolate(grid_map[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return up / up.sum(dim=(1, 2), keepdim=True)


def combined_attention(out: WARNOutput, size: tuple[int, int]) -> torch.Tensor:
    """The combined (global-gate-weighted) attention map upsampled to `size`: (N, H, W), summing to 1."""
    if out.combined_attention is None:
        raise ValueError("a model without attended layers (AD=0) has no attention map")
    return upsample(out.combined_attention, size)


def warn(**kwargs: Any) -> WARN:
    return WARN(WARNConfig(**kwargs))


def warn_16_2(**kwargs: Any) -> WARN:
    """The default model's architecture: WRN-16-2, AD=3, AW=4."""
    return WARN(WARNConfig(**{"depth": 16, "width": 2, **kwargs}))


def warn_16_4(**kwargs: Any) -> WARN:
    """WRN-16-4, AD=3, AW=4, as in the paper's CIFAR experiments."""
    return WARN(WARNConfig(**{"depth": 16, "width": 4, "input_size": (32, 32), **kwargs}))
