"""Outputs -> JSON: the body of a prediction, as /v1/predict returns it."""

from __future__ import annotations

import heapq
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
    probs = outputs["probabilities"].tolist()
    order = heapq.nlargest(top_k, range(len(probs)), key=probs.__getitem__)
    global_gates = outputs["global_gates"].tolist()
    layer_probs = outputs["layer_probabilities"].tolist()

    def top(p: list[float]) -> dict[str, Any]:
        i = max(range(len(p)), key=p.__getitem__)
        return {"label": names[i], "index": i, "probability": p[i]}

    layers = []
    for i, name in enumerate(info.layer_names):
        entry: dict[str, Any] = {"name": name, "global_gate": global_gates[i], "top_class": top(layer_probs[i])}
        if i < info.attended_layers:
            entry.update(index=i, stride=info.strides[i], gates=outputs[f"gates_{i}"].tolist())
        layers.append(entry)
    result: dict[str, Any] = {
        "model": {"name": info.name, "version": info.version},
        "top_k": [{"label": names[i], "index": i, "probability": probs[i]} for i in order],
        "global_gates": dict(zip(info.layer_names, global_gates)),
        "layers": layers,
        "image": {"width": size[0], "height": size[1]},
    }
    if with_probabilities:
        result["probabilities"] = dict(zip(names, probs))
    return result
