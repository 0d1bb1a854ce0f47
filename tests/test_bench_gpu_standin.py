"""bench.gpu_standin: its stand-in session must answer a real worker's batches as the shared session does,
with the default model's description and output shapes, or its figures say nothing of a GPU host."""

import argparse

import numpy as np
import pytest

from bench import gpu_standin
from bench.server import variant
from bench.session_standin import OUTPUTS
from service.shared_session import RemoteModel


def test_variants_are_a_label_and_settings():
    assert variant("no wait:WARN_MAX_WAIT_MS=0,WARN_DECODE_THREADS=3") == (
        "no wait",
        {"WARN_MAX_WAIT_MS": "0", "WARN_DECODE_THREADS": "3"},
    )
    assert variant("as configured:") == ("as configured", {})
    assert variant("before:checkout=/tmp/a=b") == ("before", {"checkout": "/tmp/a=b"})


@pytest.mark.parametrize("text", ["WARN_MAX_WAIT_MS=0", ":WARN_MAX_WAIT_MS=0", "x:WARN_MAX_WAIT_MS", "x:=0"])
def test_a_variant_without_a_label_or_with_a_bare_name_is_refused(text):
    with pytest.raises(argparse.ArgumentTypeError):
        variant(text)


def test_the_stand_in_serves_a_worker_the_default_model(tmp_path):
    proc, env = gpu_standin.start_session(str(tmp_path), gpu_s=0.001, rows=4, runs=2)
    try:
        model = RemoteModel(env["WARN_SESSION_ADDRESS"], bytes.fromhex(env["WARN_SESSION_KEY"]))
        assert model.info.input_size == (48, 48) and model.info.attended_layers == 3
        outputs = model.run(np.zeros((3, 3, 48, 48), np.float32))
    finally:
        proc.kill()
    assert {k: v.shape for k, v in outputs.items()} == {k: (3, *shape) for k, shape in OUTPUTS.items()}
