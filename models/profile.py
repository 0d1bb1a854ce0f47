"""Parameter and FLOP overhead of attention over the plain backbone.

warn-profile --depth 16 --width 4 --ad 3 --aw 4 --classes 10 --size 32
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from models.warn import WARN, WARNConfig


def count(model: WARN, size: tuple[int, int]) -> dict[str, int]:
    """Parameters and forward FLOPs (multiply-adds count 2) for one image."""
    model.eval()
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(torch.rand(1, 3, *size))
    return {"params": sum(p.numel() for p in model.parameters()), "flops": counter.get_total_flops()}


def overhead(config: WARNConfig) -> dict[str, Any]:
    attended = count(WARN(config), config.input_size)
    plain_cfg = WARNConfig(**{**config.to_dict(), "attention_depth": 0})
    plain = count(WARN(plain_cfg), config.input_size)
    return {
        "model": config.name,
        "input_size": list(config.input_size),
        "warn": attended,
        "backbone": plain,
        "params_overhead": attended["params"] / plain["params"] - 1,
        "flops_overhead": attended["flops"] / plain["flops"] - 1,
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=16, help="Wide-ResNet depth, 6n+4 (default: %(default)s)")
    p.add_argument("--width", type=int, default=4, help="Wide-ResNet widening factor (default: %(default)s)")
    p.add_argument("--ad", type=int, default=3, help="attention depth: attended stages (default: %(default)s)")
    p.add_argument("--aw", type=int, default=4, help="attention width: heads per stage (default: %(default)s)")
    p.add_argument("--classes", type=int, default=10, help="number of classes (default: %(default)s)")
    p.add_argument("--size", type=int, default=32, help="input side in pixels (default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> None:
    a = parser().parse_args(argv)
    cfg = WARNConfig(
        depth=a.depth,
        width=a.width,
        attention_depth=a.ad,
        attention_width=a.aw,
        num_classes=a.classes,
        input_size=(a.size, a.size),
    )
    r = overhead(cfg)
    print(json.dumps(r, indent=2))
    print(
        f"{r['model']} at {a.size}x{a.size}: attention adds {r['params_overhead']:+.2%} parameters "
        f"and {r['flops_overhead']:+.2%} FLOPs over the plain WRN-{a.depth}-{a.width}"
    )


if __name__ == "__main__":
    main()
