"""Train WARN: SGD + Nesterov with a cosine schedule, resumable, tqdm progress.

    warn-train --dataset cluttered-digits --depth 16 --width 2 --ad 3 --aw 4 --epochs 30 --out runs/x

Writes <out>/last.pt after every epoch (resumed from automatically) and <out>/model.pt at
the end: weights, the model config and the measured test figures.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import tyro
from torch.utils.data import DataLoader
from tqdm import tqdm

from models import checkpoint
from models.backbones import backbone_parameters
from models.data import ROBUST, ClutterSpec, build_dataset
from models.evaluate import evaluate
from models.warn import IMAGENET_MEAN, IMAGENET_STD, WARN, Architecture, WARNConfig


@dataclass
class TrainConfig:
    """Train WARN (Attend and Rectify) on a dataset."""

    dataset: Literal["cluttered-digits", "cifar10", "cifar100", "imagefolder"] = "cluttered-digits"
    """cluttered-digits is built in (offline); imagefolder reads DATA_ROOT/train and DATA_ROOT/val"""
    data_root: str = "data"
    """dataset folder (imagefolder: holds train/ and val/; CIFAR: where it is downloaded)"""
    download: bool = False
    """download CIFAR through torchvision (needs internet)"""
    arch: Annotated[Architecture, tyro.conf.OmitArgPrefixes] = field(default_factory=Architecture)
    """the network: its flags are declared once, in models.warn.Architecture"""
    pretrained: bool = False
    """start a torchvision backbone from torchvision's ImageNet weights (downloaded once, on your machine)"""
    weights: str | None = None
    """or from this file: a state dict saved from the same torchvision model (torch.save(m.state_dict(), f))"""
    backbone_lr: float | None = None
    """the backbone's learning rate as a fraction of --lr; None: 0.1 from pretrained weights, else 1"""
    freeze_epochs: int = 0
    """first epochs with the backbone frozen: only the attention modules, gates and last layer learn"""
    workers: int = 0
    """DataLoader worker processes (0: load in the training process)"""
    rendering: Literal["standard", "robust"] = "standard"
    """cluttered-digits training canvases: standard, or robust (digits 0.21-0.46 of the canvas, 1-8
    fragments, noise 0.02-0.16, a third inverted, a third on scene-like backgrounds, and a "none" class
    of clutter-only canvases)"""
    input_size: int = 48
    """image side for imagefolder (cluttered-digits is 48, CIFAR 32)"""
    train_per_scan: int = 8
    """cluttered-digits: training canvases rendered per source scan"""
    epochs: int = 30
    """passes over the training set"""
    batch_size: int = 64
    """images per step"""
    lr: float = 0.1
    """peak learning rate (SGD with Nesterov momentum, cosine schedule)"""
    momentum: float = 0.9
    """SGD momentum"""
    weight_decay: float = 5e-4
    """L2 weight decay"""
    warmup_epochs: float = 1.0
    """epochs of linear learning-rate warm-up"""
    seed: int = 0
    """seeds the data, the weights and the shuffling"""
    threads: int = 0
    """torch CPU threads (0: torch's default)"""
    max_steps: int = 0
    """stop after this many steps in all (0: no limit); for smoke runs"""
    out: str = "runs/warn"
    """output folder: last.pt after every epoch (resumed from), model.pt at the end"""

    @property
    def from_imagenet(self) -> bool:
        """The backbone starts from ImageNet weights (torchvision's or a file)."""
        return self.pretrained or self.weights is not None


NATIVE_SIZE = {"cluttered-digits": 48, "cifar10": 32, "cifar100": 32}
MEAN_STD = {
    "cluttered-digits": ((0.2, 0.2, 0.2), (0.3, 0.3, 0.3)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return 0.5 * base * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def build_model(cfg: TrainConfig, class_names: list[str]) -> WARN:
    side = NATIVE_SIZE.get(cfg.dataset, cfg.input_size)
    # ImageNet weights expect ImageNet's normalization
    mean, std = (
        (IMAGENET_MEAN, IMAGENET_STD) if cfg.from_imagenet else MEAN_STD.get(cfg.dataset, (IMAGENET_MEAN, IMAGENET_STD))
    )
    return WARN(
        WARNConfig(
            **asdict(cfg.arch),
            num_classes=len(class_names),
            input_size=(side, side),
            mean=mean,
            std=std,
            class_names=class_names,
        ),
        pretrained=cfg.pretrained,
        weights_file=cfg.weights,
    )


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) training; returns the final checkpoint's metadata."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    robust = cfg.rendering == "robust"
    common = dict(
        root=cfg.data_root, seed=cfg.seed, download=cfg.download, input_size=(cfg.input_size,) * 2, none_class=robust
    )
    rendering = replace(ROBUST if robust else ClutterSpec(), train_per_scan=cfg.train_per_scan)
    train_set = build_dataset(cfg.dataset, "train", augment=True, clutter=rendering, **common)
    test_set = build_dataset(cfg.dataset, "test", **common)  # always the standard rendering
    classes = list(train_set.classes)  # type: ignore[attr-defined]
    model = build_model(cfg, classes)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    model.to(device, memory_format=torch.channels_last if cuda else torch.preserve_format)
    old, new = backbone_parameters(model)
    scale = cfg.backbone_lr if cfg.backbone_lr is not None else (0.1 if cfg.from_imagenet else 1.0)
    groups = [{"params": old, "lr_scale": scale}, {"params": new, "lr_scale": 1.0}]
    opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)
    gen = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(
        train_set,
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=True,
        generator=gen,
        num_workers=cfg.workers,
        pin_memory=cuda,
        persistent_workers=cfg.workers > 0,
    )
    total = cfg.epochs * len(loader)
    warmup = int(cfg.warmup_epochs * len(loader))

    start_epoch, step = 0, 0
    last = out / "last.pt"
    if last.exists():
        state = checkpoint.read(last)
        model.load_state_dict(state["state_dict"])
        opt.load_state_dict(state["optimizer"])
        start_epoch, step = state["epoch"], state["step"]
        gen.set_state(state["generator"])
        print(f"resumed from {last} at epoch {start_epoch}")

    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        frozen = epoch < cfg.freeze_epochs
        for p in old:
            p.requires_grad_(not frozen)
        if frozen:
            model.backbone.eval()  # its batch-norm statistics stay as they were, too
        seen = correct = 0
        loss_sum = 0.0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}")
        for images, targets, _ in bar:
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, warmup, cfg.lr) * group["lr_scale"]
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            if cuda:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):  # bf16 needs no loss scaling
                result = model(images)
                loss = model.loss(result, targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            seen += len(targets)
            correct += int((result.log_probabilities.argmax(1) == targets).sum())
            loss_sum += loss.item() * len(targets)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
            if cfg.max_steps and step >= cfg.max_steps:
                break
        checkpoint.save(
            last,
            model,
            optimizer=opt.state_dict(),
            epoch=epoch + 1,
            step=step,
            generator=gen.get_state(),
            train=asdict(cfg),
        )
        if cfg.max_steps and step >= cfg.max_steps:
            break

    model.to("cpu", memory_format=torch.contiguous_format)
    started = time.perf_counter()
    metrics = evaluate(model, test_set)
    metrics["eval_seconds"] = round(time.perf_counter() - started, 1)
    meta = {"train": asdict(cfg), "dataset": cfg.dataset, "metrics": metrics, "steps": step}
    checkpoint.save(out / "model.pt", model, **meta)
    print(json.dumps(metrics, indent=2))
    print(f"wrote {out / 'model.pt'} (export it with: warn-export {out / 'model.pt'})")
    return meta


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Every option is a TrainConfig field: its type, default and docstring make the flag and its help."""
    return tyro.cli(TrainConfig, args=argv)


def main(argv: list[str] | None = None) -> None:
    from models.data import DatasetError

    try:
        train(parse_args(argv))
    except DatasetError as e:  # the user's data or paths: the message says what to do, no traceback
        sys.exit(f"warn-train: {e}")


if __name__ == "__main__":
    main()
