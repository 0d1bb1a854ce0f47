"""Backbones WARN attaches to: the CIFAR-style Wide-ResNet, or a torchvision classifier.

A backbone gives its stages' outputs (shallowest first), the channels and stride of each, and a
head that turns the last stage into class logits. For torchvision networks the stage outputs come
through torchvision's feature extraction (`create_feature_extractor`); the network itself is used
as torchvision builds it, with its classifier's last layer resized to the task's classes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from models.wrn import WideResNet

# The modules whose outputs are a torchvision family's stages (strides 4, 8, 16, 32).
STAGE_NODES = {
    "resnet": ["layer1", "layer2", "layer3", "layer4"],
    "wide_resnet": ["layer1", "layer2", "layer3", "layer4"],
    "resnext": ["layer1", "layer2", "layer3", "layer4"],
    "convnext": ["features.1", "features.3", "features.5", "features.7"],
}
TORCHVISION = ["resnet18", "resnet34", "resnet50", "resnet101", "wide_resnet50_2", "resnext50_32x4d"]
TORCHVISION += ["convnext_tiny", "convnext_small"]
BACKBONES = ["wrn", *TORCHVISION]


def family(name: str) -> str:
    return next(f for f in STAGE_NODES if name.startswith(f))


class TorchvisionBackbone(nn.Module):
    """A torchvision classifier split into stages and a head, WideResNet's interface.

    Args:
        name: a torchvision model name, e.g. resnet50 or convnext_tiny.
        num_classes: classes of the new last layer.
        pretrained: start from torchvision's ImageNet weights (downloaded once, to torch's cache).
        weights_file: or from a state dict saved from the same torchvision model.
    """

    def __init__(
        self, name: str, num_classes: int, pretrained: bool = False, weights_file: str | Path | None = None
    ) -> None:
        super().__init__()
        from torchvision import models
        from torchvision.models.feature_extraction import create_feature_extractor

        if name not in TORCHVISION:
            raise ValueError(f"unknown backbone {name!r}: choose one of {', '.join(BACKBONES)}")
        net = models.get_model(name, weights="DEFAULT" if pretrained else None)
        if weights_file is not None:
            net.load_state_dict(torch.load(weights_file, map_location="cpu", weights_only=True))
        self.nodes = nodes = STAGE_NODES[family(name)]
        if family(name) == "convnext":
            last = net.classifier[-1]
            net.classifier[-1] = nn.Linear(last.in_features, num_classes)
            self.pool_head = nn.Sequential(net.avgpool, net.classifier)
        else:
            net.fc = nn.Linear(net.fc.in_features, num_classes)
            self.pool_head = nn.Sequential(net.avgpool, nn.Flatten(1), net.fc)
        self.body = create_feature_extractor(net, return_nodes={n: str(i) for i, n in enumerate(nodes)})
        with torch.no_grad():  # channels and strides, measured once on a small input
            probe = self.body.eval()(torch.zeros(1, 3, 64, 64))
        self.body.train()
        self.stage_channels = [probe[str(i)].shape[1] for i in range(len(nodes))]
        self.stage_strides = [64 // probe[str(i)].shape[-1] for i in range(len(nodes))]

    def last_layer(self) -> nn.Linear:
        """The classifier's last layer, new for the task's classes."""
        return self.pool_head[-1] if isinstance(self.pool_head[-1], nn.Linear) else self.pool_head[-1][-1]

    def last_stage(self) -> nn.Module:
        """The module whose output is the last stage (Grad-CAM's usual target layer)."""
        return self.body.get_submodule(self.nodes[-1])

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = self.body(x)
        return [out[str(i)] for i in range(len(out))]  # (N, C_i, H / stride_i, W / stride_i)

    def final_features(self, last: torch.Tensor) -> torch.Tensor:
        return last  # torchvision stages end activated (ResNet) or normalized in the head (ConvNeXt)

    def forward_head(self, final: torch.Tensor) -> torch.Tensor:
        return self.pool_head(final)


def build_backbone(
    name: str,
    num_classes: int,
    depth: int = 16,
    width: int = 2,
    dropout: float = 0.0,
    pretrained: bool = False,
    weights_file: str | Path | None = None,
) -> nn.Module:
    if name == "wrn":
        if pretrained or weights_file:
            raise ValueError("the CIFAR-style WRN has no pretrained weights: train it from scratch")
        return WideResNet(depth, width, num_classes, dropout)
    return TorchvisionBackbone(name, num_classes, pretrained, weights_file)


def backbone_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(the backbone's own layers, everything new: attention modules, global gate, the resized last layer)."""
    fresh = {id(p) for p in model.backbone.last_layer().parameters()}
    old = [p for p in model.backbone.parameters() if id(p) not in fresh]
    kept = {id(p) for p in old}
    return old, [p for p in model.parameters() if id(p) not in kept]
