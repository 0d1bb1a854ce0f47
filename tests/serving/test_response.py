"""Outputs -> JSON (service/response.py), against numpy's own argsort and argmax."""

import json

import numpy as np
import pytest

from service.model import ModelInfo
from service.response import describe


def info(classes: int, layers: int = 3) -> ModelInfo:
    return ModelInfo(
        name="m",
        version="1",
        class_names=[f"c{i}" for i in range(classes)],
        input_size=(48, 48),
        strides=[1, 2, 4][:layers],
        layer_names=[f"attention_{i}" for i in range(layers)] + ["backbone"],
        inputs=[],
        outputs=[],
        providers=["CPUExecutionProvider"],
    )


def outputs(rng, classes: int, layers: int = 3) -> dict[str, np.ndarray]:
    out = {
        "probabilities": rng.dirichlet(np.ones(classes)).astype(np.float32),
        "layer_probabilities": rng.dirichlet(np.ones(classes), layers + 1).astype(np.float32),
        "global_gates": rng.dirichlet(np.ones(layers + 1)).astype(np.float32),
    }
    out.update({f"gates_{i}": rng.dirichlet(np.ones(4)).astype(np.float32) for i in range(layers)})
    return out


@pytest.mark.parametrize("classes", [2, 11, 1000])
def test_the_answer_is_numpys_ranking_in_plain_json(classes):
    rng = np.random.default_rng(classes)
    for _ in range(20):
        out = outputs(rng, classes)
        body = describe(info(classes), out, (640, 400), 5, True)
        order = np.argsort(-out["probabilities"], kind="stable")[:5]
        assert [t["index"] for t in body["top_k"]] == order.tolist()
        assert [t["probability"] for t in body["top_k"]] == out["probabilities"][order].tolist()
        for layer, p in zip(body["layers"], out["layer_probabilities"]):
            best = int(np.argmax(p))
            assert layer["top_class"]["index"] == best and layer["top_class"]["label"] == f"c{best}"
        assert list(body["global_gates"].values()) == out["global_gates"].tolist()
        assert body["layers"][0]["gates"] == out["gates_0"].tolist()
        assert list(body["probabilities"].values()) == out["probabilities"].tolist()
        json.dumps(body, allow_nan=False)  # plain Python types only: no numpy scalars


def test_ties_go_to_the_lower_class_index_as_numpy_does():
    out = outputs(np.random.default_rng(0), 6)
    out["probabilities"] = np.array([0.1, 0.3, 0.3, 0.1, 0.1, 0.1], np.float32)
    out["layer_probabilities"][:] = np.array([0.2, 0.2, 0.4, 0.4, 0.0, 0.0], np.float32)
    body = describe(info(6), out, (8, 8), 3, False)
    assert [t["index"] for t in body["top_k"]] == [1, 2, 0]
    assert {layer["top_class"]["index"] for layer in body["layers"]} == {2}
