"""warn-export: checkpoint in, verified and self-describing model.onnx out.

warn-export default_model/model.pt default_model/model.onnx [--triton-repo DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from export.onnx_export import ExportError, export
from export.triton import version_folder, write_repository
from models.checkpoint import CheckpointError, load


def verification_images(meta: dict, input_size: tuple[int, int], count: int = 48) -> torch.Tensor:
    """Real test images where the dataset is built in; seeded uniform noise otherwise."""
    train = meta.get("train", {})
    if meta.get("dataset") == "cluttered-digits" and tuple(input_size) == (48, 48):
        from models.data import ClutteredDigits, ClutterSpec

        ds = ClutteredDigits("test", train.get("seed", 0), ClutterSpec(test_per_scan=1))
        return ds.images[:count]
    return torch.rand(count, 3, *input_size, generator=torch.Generator().manual_seed(0))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Export a WARN checkpoint to ONNX, verified against PyTorch.")
    p.add_argument("checkpoint", help="model.pt written by warn-train")
    p.add_argument("output", nargs="?", help="default: model.onnx next to the checkpoint")
    p.add_argument("--name", help="model name (default: warn-<dataset>)")
    p.add_argument(
        "--version",
        default="1",
        help="model version stored in the metadata, and Triton's version folder (default: %(default)s)",
    )
    p.add_argument("--triton-repo", help="also write a Triton model repository here")
    p.add_argument("--max-batch-size", type=int, default=64, help="Triton's max_batch_size (default: %(default)s)")
    p.add_argument(
        "--verify-provider",
        action="append",
        choices=["cpu", "cuda"],
        help="onnxruntime provider(s) to verify parity on (repeatable; default cpu). cuda runs with TF32 off",
    )
    return p


def main(argv: list[str] | None = None) -> None:
    p = parser()
    args = p.parse_args(argv)
    if args.triton_repo:
        try:
            version_folder(args.version)
        except ValueError as e:
            p.error(f"--triton-repo: {e}")
    output = args.output or str(Path(args.checkpoint).with_name("model.onnx"))
    try:
        model, meta = load(args.checkpoint)
        name = args.name or f"warn-{meta.get('dataset') or 'model'}"
        images = verification_images(meta, model.config.input_size)
        providers = tuple(args.verify_provider or ["cpu"])
        result = export(model, meta, output, images, name=name, version=args.version, verify_providers=providers)
    except (CheckpointError, ExportError) as e:
        sys.exit(f"warn-export: {e}")
    print(json.dumps(result["verification"], indent=2))
    print(f"wrote {result['path']} ({name} v{args.version})")
    if args.triton_repo:
        folder = write_repository(output, args.triton_repo, name, args.version, args.max_batch_size)
        print(f"wrote Triton model repository {folder}")


if __name__ == "__main__":
    main()
