"""Outputs -> JSON: the body of a prediction, as /v1/predict returns it."""

from __future__ import annotations

from typing import Any

import numpy as np

from service.model import ModelInfo


def describe(
    info: ModelInfo, outputs: dict[str, np.ndarray], size: tuple[int, int], top_k: int, with_probabilities: bool
) -> dict[str, Any]:
    """One image's outputs (batch dimension removed) as JSON, without id, URLs and timings.

    `size` is the original image's (width, height).
    """
    names = info.class_names
    probs = outputs["probabilities"]
    order = np.argsort(-probs)[:top_k]
    global_gates = outputs["global_gates"]
    layer_probs = outputs["layer_probabilities"]

    def top(p: np.ndarray) -> dict[str, Any]:
        i = int(np.argmax(p))
        return {"label": names[i], "index": i, "probability": float(p[i])}

    layers = []
    for i, name in enumerate(info.layer_names):
        entry: dict[str, Any] = {"name": name, "global_gate": float(global_gates[i]), "top_class": top(layer_probs[i])}
        if i < info.attended_layers:
            entry.update(index=i, stride=info.strides[i], gates=outputs[f"gates_{i}"].astype(float).tolist())
        layers.append(entry)
    result: dict[str, Any] = {
        "model": {"name": info.name, "version": info.version},
        "top_k": [{"label": names[i], "index": int(i), "probability": float(probs[i])} for i in order],
        "global_gates": {name: float(g) for name, g in zip(info.layer_names, global_gates)},
        "layers": layers,
        "image": {"width": size[0], "height": size[1]},
    }
    if with_probabilities:
        result["probabilities"] = {names[i]: float(p) for i, p in enumerate(probs)}
    return result
