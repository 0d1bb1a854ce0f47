"""A missing or unreadable model stops start-up with a clear message and a non-zero exit."""

import pytest

from service.config import Settings
from tests.serving.conftest import Server, free_port


@pytest.mark.parametrize("kind", ["missing", "unreadable"])
def test_bad_model_stops_startup(tmp_path, kind):
    path = tmp_path / "model.onnx"
    if kind == "unreadable":
        path.write_bytes(b"definitely not onnx")
    s = Server({"WARN_MODEL_PATH": str(path)})
    try:
        code = s.proc.wait(60)
        output = s.output()
    finally:
        s.stop()
    assert code != 0
    expected = "model file not found" if kind == "missing" else "cannot load model"
    assert expected in output and str(path) in output


def test_an_onnx_file_without_warn_metadata_is_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from service.errors import ModelLoadError
    from service.model import OnnxModel

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    path = tmp_path / "plain.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), str(path))
    with pytest.raises(ModelLoadError, match="not a WARN export"):
        OnnxModel(path)


def test_the_service_never_imports_torch():
    import subprocess
    import sys

    code = "import sys, service.main; assert 'torch' not in sys.modules, 'service imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_an_export_of_an_older_format_is_refused_naming_it(model_path, tmp_path):
    import onnx

    from service.errors import ModelLoadError
    from service.model import OnnxModel

    proto = onnx.load(str(model_path))
    kept = [p for p in proto.metadata_props if p.key != "export_format"]  # as format 1 files were written
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    old = tmp_path / "old.onnx"
    onnx.save(proto, str(old))
    with pytest.raises(ModelLoadError, match="warn-export format 1.*reads format 2.*Re-export"):
        OnnxModel(old)


def test_start_up_says_which_model_and_provider_run_and_where_grpc_listens(model_path):
    """The README promises these lines in `make serve`'s output; uvicorn alone would drop them."""
    port = free_port()
    s = Server({"WARN_MODEL_PATH": str(model_path), "WARN_GRPC_PORT": str(port)}, launcher=True)
    try:
        s.wait_ready()
    finally:
        output = s.stop_and_read()
    assert f"loaded warn-cluttered-digits v1 from {model_path} on CPUExecutionProvider" in output
    assert f"Open Inference Protocol over gRPC on 127.0.0.1:{port}" in output


@pytest.mark.parametrize(
    "name, value",
    [
        ("WARN_HEADER_TIMEOUT_S", "inf"),  # grpc takes it in milliseconds as a C int: an OverflowError at start
        ("WARN_HEADER_TIMEOUT_S", "1e9"),
        ("WARN_HEADER_TIMEOUT_S", "0"),
        ("WARN_HEADER_TIMEOUT_S", "-1"),
        ("WARN_HEADER_TIMEOUT_S", "nan"),
        ("WARN_HEADER_TIMEOUT_S", "ten"),
        ("WARN_BODY_MIN_RATE", "inf"),
        ("WARN_BODY_MIN_RATE", "-5"),
        ("WARN_BODY_MIN_RATE", ""),
    ],
)
def test_connection_bounds_refuse_values_that_mean_nothing(monkeypatch, name, value):
    from pydantic import ValidationError

    from service.config import Settings

    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=name.removeprefix("WARN_")):
        Settings()


FLOAT_SETTINGS = [n for n, f in Settings.model_fields.items() if f.annotation is float]


@pytest.mark.parametrize("name", FLOAT_SETTINGS)
@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_no_float_setting_takes_inf_or_nan(monkeypatch, name, value):
    """An infinite STORE_TTL_S made every signed prediction a 500 (its URLs' expiry cannot be an integer)."""
    from pydantic import ValidationError

    from service.config import Settings

    monkeypatch.setenv(f"WARN_{name}", value)
    with pytest.raises(ValidationError, match=name):
        Settings()


def test_the_longest_store_ttl_still_signs_urls_that_open(model_path, monkeypatch):
    from pydantic import ValidationError

    from service.config import Settings
    from tests.serving.conftest import make_client, png

    longest = 10 * 365 * 86400
    monkeypatch.setenv("WARN_STORE_TTL_S", str(longest + 1))
    with pytest.raises(ValidationError, match="STORE_TTL_S"):
        Settings()
    from PIL import Image

    with make_client(model_path, STORE_TTL_S=longest, API_KEY="k", SIGNED_URLS=True) as c:
        image = png(Image.new("RGB", (16, 16)))
        made = c.post("/v1/predict", content=image, headers={"content-type": "image/png", "authorization": "Bearer k"})
        assert made.status_code == 200, made.text
        urls = made.json()["attention_urls"]
        assert c.get(urls["combined"]).status_code == 200


def test_a_running_app_leaves_its_start_up_objects_out_of_garbage_collection(model_path):
    import gc

    from service.memory import YOUNG_THRESHOLD
    from tests.serving.conftest import make_client

    gc.unfreeze()
    before = gc.get_threshold()
    with make_client(model_path) as client:
        assert client.get("/v2/health/ready").status_code == 200
        assert gc.get_freeze_count() > 10_000  # the app, its routes and the session's metadata among them
        assert gc.get_threshold() == (YOUNG_THRESHOLD, *before[1:])
    assert gc.get_freeze_count() == 0 and gc.get_threshold() == before  # as it was, for the apps that follow
