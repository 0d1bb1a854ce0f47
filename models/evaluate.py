"""Evaluation: top-1 accuracy and the Pointing Game (Zhang et al., 2016) with trivial baselines."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np
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
    gates: dict[str, list[torch.Tensor]] = {}
    for images, targets, boxes in DataLoader(dataset, batch_size=batch_size):
        out = model(images)
        correct += int((out.log_probabilities.argmax(1) == targets).sum())
        total += len(targets)
        for name, g in [("global", out.global_gates), *((f"layer_{i}", g) for i, g in enumerate(out.gates))]:
            gates.setdefault(name, []).append(g)
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
    if model.attention:
        result["gates"] = {name: gate_statistics(torch.cat(g)) for name, g in gates.items()}
    if boxed:
        result["pointing_game"] = {k: v / boxed for k, v in pg.items()}
        result["pointing_game_tolerance_px"] = POINTING_TOLERANCE
        best = max(v for k, v in result["pointing_game"].items() if k.startswith("baseline_"))
        result["pointing_game_margin"] = result["pointing_game"]["combined"] - best
    return result


def gate_statistics(gates: torch.Tensor) -> dict[str, Any]:
    """How much gates (N, G) vary from image to image: each gate's mean and standard deviation, and the
    entropy of the gates of an image (nats; log G when all are equal, 0 when one takes all)."""
    entropy = -(gates * gates.clamp_min(1e-12).log()).sum(1)
    return {
        "mean": [round(v, 4) for v in gates.mean(0).tolist()],
        "std": [round(v, 4) for v in gates.std(0).tolist()],
        "entropy_mean": round(float(entropy.mean()), 4),
        "entropy_std": round(float(entropy.std()), 4),
    }


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


def renderings() -> dict[str, Any]:
    """The test split's scans drawn differently from training: the robustness report's inputs."""
    from models.data import ClutterSpec

    base = ClutterSpec()
    return {
        "standard": base,
        "digits x0.8 (10-13 px)": ClutterSpec(digit_min=10, digit_max=13),
        "digits x1.3 (16-21 px)": ClutterSpec(digit_min=16, digit_max=21),
        "clutter 6-10 fragments": ClutterSpec(fragments=(6, 10)),
        "noise 0.16": ClutterSpec(noise=0.16),
        "inverted (dark ink on light)": ClutterSpec(inverted=1.0),
    }


def _letterboxed(img: Any, size: tuple[int, int]) -> torch.Tensor:
    from PIL import ImageOps

    array = np.asarray(img)
    fill = tuple(int(c) for c in array.reshape(-1, 3).mean(0))
    img = ImageOps.pad(img, (size[1], size[0]), color=fill)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)


def _pictures() -> list[Any]:
    """Pictures with no digit, made by other hands: scikit-learn's two sample photos first, then
    matplotlib's portrait and gift icon (on white), as RGB PIL images."""
    import matplotlib.cbook
    from PIL import Image
    from sklearn.datasets import load_sample_images

    pictures = [Image.fromarray(a) for a in load_sample_images().images]
    for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png"):
        with Image.open(matplotlib.cbook.get_sample_data(name)) as img:
            rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        pictures.append(Image.alpha_composite(white, rgba).convert("RGB"))
    return pictures


def sample_photos(size: tuple[int, int]) -> torch.Tensor:
    """scikit-learn's two sample photos (no digit in them), letterboxed to `size`: (2, 3, H, W)."""
    return torch.stack([_letterboxed(img, size) for img in _pictures()[:2]])


def photo_crops(size: tuple[int, int]) -> torch.Tensor:
    """The 4 pictures of `_pictures`, each whole and as its four quadrants, letterboxed to `size`: (20, 3, H, W)."""
    crops = []
    for img in _pictures():
        w, h = img.size
        cx, cy = w // 2, h // 2
        boxes = [(0, 0, w, h), (0, 0, cx, cy), (cx, 0, w, cy), (0, cy, cx, h), (cx, cy, w, h)]
        crops += [_letterboxed(img.crop(b), size) for b in boxes]
    return torch.stack(crops)


@torch.inference_mode()
def robustness(model: WARN, seed: int = 0) -> dict[str, Any]:
    """Top-1 and Pointing Game on shifted renderings of the test split, and what the model answers when
    there is no digit at all (clutter-only canvases, real photos)."""

    from models.data import NONE_CLASS, ClutteredDigits, clutter_only

    model.eval()
    has_none = NONE_CLASS in model.config.class_names
    report: dict[str, Any] = {}
    for name, spec in renderings().items():
        r = evaluate(model, ClutteredDigits("test", seed, spec, none_class=has_none))
        report[name] = {"top1_accuracy": r["top1_accuracy"], "pointing_game": r["pointing_game"]["combined"]}
    for name, images in (
        ("clutter only (300 canvases)", clutter_only(300, seed)),
        ("scikit-learn sample photos (2)", sample_photos(model.config.input_size)),
        ("photos and their quadrants (20)", photo_crops(model.config.input_size)),
    ):
        p = model(images).probabilities
        answer = {"top_probability_mean": float(p.max(1).values.mean())}
        if has_none:
            answer["answered_none"] = float((p.argmax(1) == model.config.class_names.index(NONE_CLASS)).float().mean())
        else:  # the model has no way to say so: what it says instead
            labels = [model.config.class_names[i] for i in p.argmax(1).tolist()]
            answer["most_common_answer"] = max(set(labels), key=labels.count)
        report[name] = answer
    return report


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Evaluate a WARN checkpoint: accuracy and Pointing Game.")
    p.add_argument("checkpoint", help="model.pt written by warn-train")
    p.add_argument("--dataset", help="dataset to evaluate on (default: the checkpoint's training dataset)")
    p.add_argument("--data-root", default="data", help="dataset folder (default: %(default)s)")
    p.add_argument("--seed", type=int, help="dataset seed (default: the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=128, help="images per forward pass (default: %(default)s)")
    p.add_argument("--update-checkpoint", action="store_true", help="record these figures in the checkpoint")
    p.add_argument(
        "--robustness",
        action="store_true",
        help="cluttered-digits: accuracy and Pointing Game on shifted renderings; answers on images without digits",
    )
    p.add_argument(
        "--compare",
        choices=["gradcam"],
        help="also localize with Grad-CAM (pytorch-grad-cam) on the same images: Pointing Game and cost per image",
    )
    return p


def main(argv: list[str] | None = None) -> None:
    from models.data import DatasetError

    args = parser().parse_args(argv)
    try:
        run(args)
    except DatasetError as e:  # the user's data or paths: the message says what to do, no traceback
        sys.exit(f"warn-eval: {e}")


def run(args: argparse.Namespace) -> None:
    from models.checkpoint import load, read, save
    from models.data import NONE_CLASS, build_dataset

    model, meta = load(args.checkpoint)
    train = meta.get("train", {})
    seed = args.seed if args.seed is not None else train.get("seed", 0)
    ds = build_dataset(
        args.dataset or train.get("dataset", "cluttered-digits"),
        "test",
        root=args.data_root,
        seed=seed,
        input_size=model.config.input_size,
        none_class=NONE_CLASS in model.config.class_names,
    )
    metrics = evaluate(model, ds, args.batch_size)
    if args.robustness:
        metrics["robustness"] = robustness(model, seed)
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
