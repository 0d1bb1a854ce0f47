"""Evaluation: top-1 accuracy and the Pointing Game (Zhang et al., 2016) with trivial baselines."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from models.warn import WARN, WARNOutput, combined_attention, upsample

POINTING_TOLERANCE = 2  # pixels a hit may fall outside the ground-truth box


def layer_maps(out: WARNOutput, size: tuple[int, int]) -> list[torch.Tensor]:
    """Each attended layer's heads mixed by its gates, upsampled to `size`: L x (N, H, W)."""
    return [upsample(m, size) for m in out.attention_maps]


def argmax_xy(maps: torch.Tensor) -> torch.Tensor:
    """(N, H, W) -> (N, 2) integer (x, y) of each map's maximum."""
    w = maps.shape[-1]
    idx = maps.flatten(1).argmax(1)
    return torch.stack([idx % w, idx // w], dim=1)


def hits(points: torch.Tensor, boxes: torch.Tensor, tol: int = POINTING_TOLERANCE) -> torch.Tensor:
    x, y = points[:, 0], points[:, 1]
    return (x >= boxes[:, 0] - tol) & (x < boxes[:, 2] + tol) & (y >= boxes[:, 1] - tol) & (y < boxes[:, 3] + tol)


def baseline_points(images: torch.Tensor, window: int) -> dict[str, torch.Tensor]:
    """Where three attention-free guesses point: canvas centre, brightest pixel, densest ink window."""
    n, _, h, w = images.shape
    grey = images.mean(1)  # (N, H, W)
    centre = torch.tensor([w // 2, h // 2]).expand(n, 2)
    ink = F.avg_pool2d(grey[:, None], window, stride=1, padding=window // 2, count_include_pad=False)[:, 0, :h, :w]
    return {"centre": centre, "brightest": argmax_xy(grey), "densest_window": argmax_xy(ink)}


@torch.inference_mode()
def evaluate(model: WARN, dataset: Dataset, batch_size: int = 128, window: int = 14) -> dict[str, Any]:
    """Accuracy, and where boxes exist, Pointing Game per attended layer, combined, and baselines."""
    model.eval()
    correct = total = 0
    pg: dict[str, int] = {}
    boxed = 0
    for images, targets, boxes in DataLoader(dataset, batch_size=batch_size):
        out = model(images)
        correct += int((out.log_probabilities.argmax(1) == targets).sum())
        total += len(targets)
        has_box = boxes[:, 0] >= 0
        if not out.attention or not has_box.any():
            continue
        size = images.shape[-2:]
        guesses = {f"layer_{i}": argmax_xy(m) for i, m in enumerate(layer_maps(out, size))}
        guesses["combined"] = argmax_xy(combined_attention(out, size))
        guesses.update({f"baseline_{k}": v for k, v in baseline_points(images, window).items()})
        for k, pts in guesses.items():
            pg[k] = pg.get(k, 0) + int(hits(pts[has_box], boxes[has_box]).sum())
        boxed += int(has_box.sum())
    result: dict[str, Any] = {"images": total, "top1_accuracy": correct / max(total, 1)}
    if boxed:
        result["pointing_game"] = {k: v / boxed for k, v in pg.items()}
        result["pointing_game_tolerance_px"] = POINTING_TOLERANCE
        best = max(v for k, v in result["pointing_game"].items() if k.startswith("baseline_"))
        result["pointing_game_margin"] = result["pointing_game"]["combined"] - best
    return result


class Decision(torch.nn.Module):
    """WARN's final answer as a plain (N, C) output, the form Grad-CAM differentiates."""

    def __init__(self, model: WARN) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).log_probabilities


def compare_gradcam(model: WARN, dataset: Dataset, batch_size: int = 32) -> dict[str, Any]:
    """Pointing Game and cost per image of WARN's combined map against Grad-CAM (pytorch-grad-cam) on the
    backbone's last stage for the predicted class, on the same images, with the same tolerance.

    WARN's map comes with the forward pass; Grad-CAM needs a forward and a backward pass per batch.
    """
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model.eval()
    found = {"warn": 0, "gradcam": 0}
    seconds = {"warn": 0.0, "gradcam": 0.0}
    boxed = 0
    with GradCAM(model=Decision(model), target_layers=[model.backbone.last_stage()]) as cam:
        for images, _, boxes in DataLoader(dataset, batch_size=batch_size):
            keep = boxes[:, 0] >= 0
            if not keep.any():
                continue
            images, boxes = images[keep], boxes[keep]
            started = time.perf_counter()
            with torch.inference_mode():
                out = model(images)
                warn_points = argmax_xy(combined_attention(out, images.shape[-2:]))
            seconds["warn"] += time.perf_counter() - started
            predicted = out.log_probabilities.argmax(1).tolist()
            started = time.perf_counter()
            heat = cam(input_tensor=images, targets=[ClassifierOutputTarget(c) for c in predicted])  # (N, H, W)
            seconds["gradcam"] += time.perf_counter() - started
            found["warn"] += int(hits(warn_points, boxes).sum())
            found["gradcam"] += int(hits(argmax_xy(torch.from_numpy(heat)), boxes).sum())
            boxed += len(images)
    model.zero_grad(set_to_none=True)  # Grad-CAM's backward passes leave gradients behind
    if not boxed:
        raise ValueError("the Grad-CAM comparison needs a dataset with object boxes (cluttered-digits)")
    per_image = {k: 1e3 * v / boxed for k, v in seconds.items()}
    return {
        "images": boxed,
        "pointing_game_tolerance_px": POINTING_TOLERANCE,
        "pointing_game": {k: v / boxed for k, v in found.items()},
        "ms_per_image": per_image,
        "gradcam_cost_vs_warn": per_image["gradcam"] / per_image["warn"],
        "batch_size": batch_size,
        "threads": torch.get_num_threads(),
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Evaluate a WARN checkpoint: accuracy and Pointing Game.")
    p.add_argument("checkpoint", help="model.pt written by warn-train")
    p.add_argument("--dataset", help="dataset to evaluate on (default: the checkpoint's training dataset)")
    p.add_argument("--data-root", default="data", help="dataset folder (default: %(default)s)")
    p.add_argument("--seed", type=int, help="dataset seed (default: the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=128, help="images per forward pass (default: %(default)s)")
    p.add_argument("--update-checkpoint", action="store_true", help="record these figures in the checkpoint")
    p.add_argument(
        "--compare",
        choices=["gradcam"],
        help="also localize with Grad-CAM (pytorch-grad-cam) on the same images: Pointing Game and cost per image",
    )
    return p


def main(argv: list[str] | None = None) -> None:
    from models.checkpoint import load, read, save
    from models.data import build_dataset

    args = parser().parse_args(argv)
    model, meta = load(args.checkpoint)
    train = meta.get("train", {})
    ds = build_dataset(
        args.dataset or train.get("dataset", "cluttered-digits"),
        "test",
        root=args.data_root,
        seed=args.seed if args.seed is not None else train.get("seed", 0),
        input_size=model.config.input_size,
    )
    metrics = evaluate(model, ds, args.batch_size)
    if args.compare == "gradcam":
        metrics["gradcam_comparison"] = compare_gradcam(model, ds, min(args.batch_size, 32))
    print(json.dumps(metrics, indent=2))
    if args.update_checkpoint:
        payload = read(args.checkpoint)
        extra = {k: v for k, v in payload.items() if k not in ("format", "config", "state_dict")}
        save(args.checkpoint, model, **{**extra, "metrics": {**payload.get("metrics", {}), **metrics}})
        print(f"recorded in {args.checkpoint}")


if __name__ == "__main__":
    main()
