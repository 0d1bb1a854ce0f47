"""What attention costs on other networks than the default model's: FLOPs and onnxruntime throughput of
WARN against its AD=0 backbone, random weights (not a test).

    .venv/bin/python -m bench.overhead                         # the default model's shape and its neighbours
    .venv/bin/python -m bench.overhead --arch 16-2:3 --arch 10-2:2

An --arch is DEPTH-WIDTH:AD (attention width 4, 11 classes, 48x48, as the default model). Each network
and its backbone run at batch 32 in interleaved rounds, so a noisy neighbour slows both alike.
"""

from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench.run import interleaved, ort_session
from bench.server import f
from export.onnx_export import _export
from models.profile import count
from models.warn import WARN, WARNConfig, plain_backbone

DEFAULTS = ("10-2:3", "10-2:2", "10-3:3", "10-4:3", "16-2:3")


def arch(text: str) -> tuple[int, int, int]:
    """DEPTH-WIDTH:AD as (depth, width, ad)."""
    m = re.fullmatch(r"(\d+)-(\d+):(\d)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected DEPTH-WIDTH:AD, e.g. 16-2:3, got {text!r}")
    depth, width, ad = (int(v) for v in m.groups())
    if (depth - 4) % 6 or depth < 10 or width < 1 or ad > 3:
        raise argparse.ArgumentTypeError(f"a Wide-ResNet is 6n+4 deep (n >= 1), 1+ wide, AD 0-3: got {text!r}")
    return depth, width, ad


def measure(depth: int, width: int, ad: int, threads: int, seconds: float, rounds: int = 4) -> dict:
    config = WARNConfig(
        depth=depth, width=width, attention_depth=ad, attention_width=4, num_classes=11, gate_tanh=False
    )
    torch.manual_seed(0)
    model = WARN(config).eval()
    plain = plain_backbone(model)
    x = np.random.default_rng(0).random((32, 3, *config.input_size), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        for key, m in (("warn", model), ("backbone", plain)):
            _export(m, Path(tmp) / f"{key}.onnx")
            sessions[key] = ort_session(Path(tmp) / f"{key}.onnx", threads)
        rates = interleaved(sessions, x, seconds, rounds)
    cw, cp = count(model, config.input_size), count(plain, config.input_size)
    warn, backbone = rates["warn"], rates["backbone"]
    return {
        "arch": f"WRN-{depth}-{width}, AD={ad}",
        "flops_overhead": cw["flops"] / cp["flops"] - 1,
        "warn_img_s": warn,
        "backbone_img_s": backbone,
        "ratio": warn / backbone,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--arch", action="append", type=arch, help=f"DEPTH-WIDTH:AD, repeatable (default: {', '.join(DEFAULTS)})"
    )
    p.add_argument("--seconds", type=float, default=6.0, help="per network, over all rounds")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: its default)")
    a = p.parse_args()
    if a.seconds <= 0 or a.threads < 0:
        p.error("--seconds must be positive and --threads at least 0")
    rows = [measure(*net, a.threads, a.seconds) for net in a.arch or [arch(d) for d in DEFAULTS]]
    print("| network (48x48, AW=4, 11 classes) | FLOPs over backbone | WARN vs backbone, batch 32 |")
    print("|---|---|---|")
    for r in rows:
        print(
            f"| {r['arch']} | {r['flops_overhead']:+.1%} | "
            f"{f(r['warn_img_s'])} vs {f(r['backbone_img_s'])} img/s: {r['ratio']:.2f}x |"
        )


if __name__ == "__main__":
    main()
