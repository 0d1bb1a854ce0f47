"""ONNX export of WARN with attention masks and gates as named outputs.

The ONNX file is the contract between training and serving: one input `image` (N, 3, H, W),
float32 RGB in [0, 1] (normalization is inside the graph), and these outputs, N first:

    probabilities, log_probabilities  (N, C)      final, globally gated
    attention_<i>                     (N, K, h, w) spatial-softmax masks of attended layer i
    gates_<i>                         (N, K)      layer gates of attended layer i
    layer_probabilities               (N, L+1, C) each attended layer's hypothesis, then the backbone's
    global_gates                      (N, L+1)    global gate weights, same order
    attention_map_<i>                 (N, h, w)   layer i's heads mixed by its gates
    attention_combined                (N, h_L, w_L) layers mixed by the global gates, on the coarsest grid

Layer i = 0 is the shallowest attended layer. The maps are computed in the graph, so evaluation
(PyTorch) and the service (onnxruntime) draw the same thing from one definition. Everything a
server needs to label and draw the outputs is stored in the file's metadata_props (see `metadata`),
including `export_format`: 1 had no map outputs, 2 adds them.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxscript
import torch
from torch import nn

from models.attention import mask_forms
from models.warn import WARN

OPSET = 18
INPUT_NAME = "image"
EXPORT_FORMAT = 2  # the output contract's version, stored in metadata_props["export_format"]
# Largest absolute differences accepted between onnxruntime (CPU) and PyTorch eval (float32).
# Attention masks get 5e-5, not 1e-5: on the default model PyTorch's own float32 result is 2.0e-5
# from a float64 evaluation on the sharpest mask (0.99 of its mass in one cell), while
# onnxruntime's is 2.2e-6 from it. Log-probabilities of very unlikely classes (about -40) carry
# about 1.4e-4 of float32 error in PyTorch itself, hence 1e-3 there.
TOLERANCES = {"probabilities": 1e-4, "log_probabilities": 1e-3, "gates": 1e-4, "attention": 5e-5}


class ExportError(RuntimeError):
    """The export failed or its result does not match PyTorch."""


def output_names(layers: int) -> list[str]:
    return [
        "probabilities",
        "log_probabilities",
        *(f"attention_{i}" for i in range(layers)),
        *(f"gates_{i}" for i in range(layers)),
        "layer_probabilities",
        "global_gates",
        *(f"attention_map_{i}" for i in range(layers)),
        *(["attention_combined"] if layers else []),
    ]


def output_meanings(layers: int) -> dict[str, str]:
    meanings = {
        "probabilities": "(N, C) final class probabilities, globally gated",
        "log_probabilities": "(N, C) natural log of probabilities",
        "layer_probabilities": "(N, L+1, C) class probabilities of each attended layer (shallowest first), "
        "then of the backbone",
        "global_gates": "(N, L+1) global gate weight of each attended layer, then of the backbone; sums to 1",
    }
    for i in range(layers):
        meanings[f"attention_{i}"] = f"(N, K, h, w) attention heads of attended layer {i}; each sums to 1 over space"
        meanings[f"gates_{i}"] = f"(N, K) layer gates of attended layer {i}: trust in each head; sums to 1"
        meanings[f"attention_map_{i}"] = f"(N, h, w) attended layer {i}'s heads mixed by its gates; sums to 1"
    if layers:
        meanings["attention_combined"] = (
            "(N, h, w) on the coarsest attended grid: each layer's map summed into that grid, mixed by the "
            "global gates (backbone left out, renormalized); sums to 1"
        )
    return meanings


class Flat(nn.Module):
    """WARN with its structured output flattened in `output_names` order, for export."""

    def __init__(self, model: WARN) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(image)
        return (
            out.probabilities,
            out.log_probabilities,
            *out.attention,
            *out.gates,
            out.layer_log_probabilities.exp(),
            out.global_gates,
            *out.attention_maps,
            *(() if out.combined_attention is None else (out.combined_attention,)),
        )


def weights_sha256(model: nn.Module) -> str:
    """Digest of the state dict's tensors in key order: names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        a = t.detach().cpu().contiguous().numpy()
        h.update(f"{name}|{a.dtype}|{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def pointing_game(metrics: dict[str, Any], layers: int) -> dict[str, Any]:
    """{"layers": [per attended layer, or None], "combined": ..., "tolerance_px": ...} from warn-eval's figures."""
    found = metrics.get("pointing_game", {})
    return {
        "layers": [found.get(f"layer_{i}") for i in range(layers)],
        "combined": found.get("combined"),
        "tolerance_px": metrics.get("pointing_game_tolerance_px"),
    }


def metadata(model: WARN, meta: dict[str, Any], name: str, version: str) -> dict[str, str]:
    """The metadata_props written to the ONNX file; every value is a string, JSON where structured."""
    cfg = model.config
    layers = len(model.attended)
    return {
        "model_name": name,
        "model_version": version,
        "export_format": str(EXPORT_FORMAT),
        "class_names": json.dumps(cfg.class_names),
        "input_size": json.dumps(list(cfg.input_size)),
        "normalization": json.dumps({"mean": list(cfg.mean), "std": list(cfg.std), "applied_in_graph": True}),
        "input_format": "image: float32 (N, 3, H, W), RGB scaled to [0, 1]",
        "architecture": json.dumps(
            {
                "name": "WARN",
                "backbone": "wide-resnet" if cfg.backbone == "wrn" else cfg.backbone,
                **({"depth": cfg.depth, "width": cfg.width} if cfg.backbone == "wrn" else {}),
                "attention_depth": cfg.attention_depth,
                "attention_width": cfg.attention_width,
                "num_classes": cfg.num_classes,
            }
        ),
        "attention_strides": json.dumps(model.strides),
        "layer_names": json.dumps([*(f"attention_{i}" for i in range(layers)), "backbone"]),
        "outputs": json.dumps(output_meanings(layers)),
        "dataset": str(meta.get("dataset", "")),
        "metrics": json.dumps(meta.get("metrics", {})),
        # how often each attended layer's map (then the combined one) points at the object, where measured
        "pointing_game": json.dumps(pointing_game(meta.get("metrics", {}), layers)),
        "weights_sha256": weights_sha256(model),
    }


def _export(model: WARN, path: Path, reordered: bool = True) -> None:
    """`reordered=False`: every mask logit as one 3x3 convolution, as PyTorch computes it (bench.ops)."""
    h, w = model.config.input_size
    example = torch.rand(2, 3, h, w)
    batch = torch.export.Dim("batch", min=1, max=4096)
    # Mask logits in forms that onnxruntime's CPU provider runs faster (models.attention.mask_logits).
    # The shallowest attended layer has the largest intermediates: "taps" there raised peak memory.
    forms = {m: "taps" for m in [*model.attention[1:], model.global_gate] if m is not None}
    if len(model.attention):
        forms[model.attention[0]] = "rows"
    with warnings.catch_warnings(), mask_forms(forms if reordered else {}):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            Flat(model).eval(),
            (example,),
            input_names=[INPUT_NAME],
            output_names=output_names(len(model.attended)),
            dynamic_shapes={"image": {0: batch}},
            opset_version=OPSET,
            dynamo=True,
            verbose=False,
        )
        # Fold the reshaped head weights into initializers here, whatever their size (the exporter's
        # own pass stops at 8k elements): otherwise onnxruntime folds them at every load and holds
        # several copies at once (1000 classes at 112x112: 466 MB load peak instead of 175 MB).
        onnxscript.optimizer.optimize(program.model, input_size_limit=1 << 31, output_size_limit=1 << 31)
    program.save(str(path), external_data=False)


def tolerance_group(output: str) -> str:
    """Which TOLERANCES entry an output is held to."""
    if output.startswith("attention_"):  # masks and maps
        return "attention"
    if output.startswith("gates_") or output == "global_gates":
        return "gates"
    return "log_probabilities" if output == "log_probabilities" else "probabilities"


def compare(session: Any, model: WARN, images: torch.Tensor) -> dict[str, float]:
    """Largest absolute difference per output group between onnxruntime and PyTorch, and top-1 agreement."""
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(None, {INPUT_NAME: images.numpy()})))
    with torch.inference_mode():
        want = dict(zip(output_names(len(model.attended)), (t.numpy() for t in Flat(model)(images))))
    diffs: dict[str, float] = {}
    for name, expected in want.items():
        group = tolerance_group(name)
        if got[name].shape != expected.shape:
            raise ExportError(f"output {name}: ONNX shape {got[name].shape} != PyTorch {expected.shape}")
        diffs[group] = max(diffs.get(group, 0.0), float(np.abs(got[name] - expected).max()))
    diffs["top1_agreement"] = float((got["probabilities"].argmax(1) == want["probabilities"].argmax(1)).mean())
    return diffs


def providers_for(name: str) -> list[Any]:
    """onnxruntime providers for verification on `name` ('cpu' or 'cuda').

    CUDA runs with TF32 off: onnxruntime turns it on by default, and then its probabilities differ
    from float32 by about 2e-3, which says nothing about the export. The service's default is off too.
    """
    import onnxruntime as ort

    if name == "cpu":
        return ["CPUExecutionProvider"]
    if name != "cuda":
        raise ExportError(f"unknown verification provider {name!r} (cpu or cuda)")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise ExportError(
            "--verify-provider cuda: this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)"
        )
    return [("CUDAExecutionProvider", {"use_tf32": "0"})]


def verify(
    path: str | Path,
    model: WARN,
    images: torch.Tensor,
    batch_sizes: tuple[int, ...] = (1, 3, 16),
    provider: str = "cpu",
) -> dict:
    """Check the file with onnx.checker and against PyTorch on `images`, in batches of each size.

    Raises ExportError naming the first output group past its tolerance, or any top-1 disagreement.
    """
    import onnxruntime as ort

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"onnx.checker rejected {path}: {e}") from e
    session = ort.InferenceSession(str(path), providers=providers_for(provider))
    if provider == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
        raise ExportError(f"--verify-provider cuda: onnxruntime fell back to {session.get_providers()}")
    model.eval()
    report: dict[str, Any] = {"images": len(images), "provider": provider, "tolerances": TOLERANCES, "batches": {}}
    for bs in batch_sizes:
        worst: dict[str, float] = {}
        agree = []
        for start in range(0, len(images), bs):
            batch = images[start : start + bs]
            d = compare(session, model, batch)
            agree.append(d.pop("top1_agreement") * len(batch))
            worst = {k: max(worst.get(k, 0.0), v) for k, v in d.items()}
        worst["top1_agreement"] = sum(agree) / len(images)
        report["batches"][bs] = worst
        for group, tol in TOLERANCES.items():
            if worst.get(group, 0.0) > tol:
                raise ExportError(
                    f"ONNX output differs from PyTorch at batch size {bs}: {group} max |diff| "
                    f"{worst[group]:.3g} > tolerance {tol:g}"
                )
        if worst["top1_agreement"] < 1.0:
            raise ExportError(f"ONNX top-1 class disagrees with PyTorch on some images at batch size {bs}")
    return report


def export(
    model: WARN,
    meta: dict[str, Any],
    out: str | Path,
    images: torch.Tensor,
    *,
    name: str,
    version: str = "1",
    verify_providers: tuple[str, ...] = ("cpu",),
) -> dict[str, Any]:
    """Export, verify, add metadata, and move into place at `out` only if all of it succeeded."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            _export(model, tmp)
        except Exception as e:
            raise ExportError(f"torch.onnx.export failed: {e}") from e
        proto = onnx.load(str(tmp))
        props = metadata(model, meta, name, version)
        del proto.metadata_props[:]
        for k, v in props.items():
            proto.metadata_props.add(key=k, value=v)
        proto.doc_string = "WARN (Attend and Rectify) classifier with attention masks and gates as outputs"
        onnx.save(proto, str(tmp))
        report = {p: verify(tmp, model, images, provider=p) for p in verify_providers}
        umask = os.umask(0)
        os.umask(umask)
        # as open() would create it: mkstemp's 0600 keeps out the service's own user (uid 10001 in the image)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {"path": str(out), "metadata": props, "verification": report}
