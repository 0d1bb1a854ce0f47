"""Row 11: the Open Inference Protocol over gRPC vs over HTTP, the same binary FP32 request, one load tool.

h2load (Debian's nghttp2-client) drives both: HTTP/1.1 with `--h1`, and gRPC as what it is on the
wire, an HTTP/2 POST of a length-prefixed protobuf. Each connection has one request in flight.
Latency percentiles come from h2load's per-request log.
"""

from __future__ import annotations

import json
import re
import struct
import subprocess
import tempfile
from pathlib import Path

import numpy as np

GRPC_PATH = "/inference.GRPCInferenceService/ModelInfer"


def http_body(x: np.ndarray, output: str) -> tuple[bytes, int]:
    """An infer request in the protocol's binary form (JSON header, then the raw FP32 tensor), as
    tritonclient.http sends it, and its header's length (the Inference-Header-Content-Length)."""
    x = np.ascontiguousarray(x, np.float32)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "datatype": "FP32",
                    "shape": list(x.shape),
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "outputs": [{"name": output, "parameters": {"binary_data": True}}],
        }
    ).encode()
    return header + x.tobytes(), len(header)


def grpc_body(name: str, x: np.ndarray, output: str) -> bytes:
    """A ModelInferRequest as tritonclient.grpc sends it (raw contents), framed for the wire."""
    from tritonclient.grpc import service_pb2 as pb

    request = pb.ModelInferRequest(model_name=name)
    request.inputs.add(name="image", datatype="FP32", shape=x.shape)
    request.outputs.add(name=output)
    request.raw_input_contents.append(np.ascontiguousarray(x, np.float32).tobytes())
    message = request.SerializeToString()
    return b"\0" + struct.pack(">I", len(message)) + message


def check_grpc(address: str, name: str, x: np.ndarray, output: str) -> int:
    """Sends the bench's request once through the generated stub; returns the framed response's size."""
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        request = pb.ModelInferRequest.FromString(grpc_body(name, x, output)[5:])
        reply = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    assert reply.outputs[0].name == output
    return 5 + reply.ByteSize()


def h2load(url: str, connections: int, seconds: float, body: bytes, headers: dict[str, str], h1: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        data, log = Path(tmp) / "body", Path(tmp) / "log"
        data.write_bytes(body)
        cmd = ["h2load", "-c", str(connections), "-m", "1", "-d", str(data), *(["--h1"] if h1 else [])]
        for k, v in headers.items():
            cmd += ["-H", f"{k}: {v}"]
        # a separate warm-up run: h2load's own counts its bytes but not its requests
        subprocess.run([*cmd, "-D", "1", url], capture_output=True, check=True)
        measure = ["-D", str(max(1, round(seconds))), "--log-file", str(log), url]
        out = subprocess.run([*cmd, *measure], capture_output=True, text=True, check=True).stdout
        rows = [line.split("\t") for line in log.read_text().splitlines()]
    done = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed", out)
    rate = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    body_bytes = re.search(r"\((\d+)\) data", out)
    if not (done and rate and body_bytes):
        raise RuntimeError(f"h2load against {url} printed no figures:\n{out}")
    ms = np.array([int(r[2]) / 1000 for r in rows if r[1] == "200"])
    succeeded = int(done.group(4))
    return {
        "connections": connections,
        "req_s": float(rate.group(1)),
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "failed": int(done.group(3)) - succeeded,
        "bytes_per_answer": int(body_bytes.group(1)) / max(succeeded, 1),
    }


def http_v2(base_url: str, name: str, body: bytes, header_length: int, connections: int, seconds: float) -> dict:
    headers = {"content-type": "application/octet-stream", "inference-header-content-length": str(header_length)}
    return h2load(f"{base_url}/v2/models/{name}/infer", connections, seconds, body, headers, h1=True)


def grpc_v2(address: str, body: bytes, answer_bytes: int, connections: int, seconds: float) -> dict:
    headers = {"content-type": "application/grpc", "te": "trailers"}
    r = h2load(f"http://{address}{GRPC_PATH}", connections, seconds, body, headers, h1=False)
    # an error is a trailers-only answer with HTTP status 200: count answers without the full message
    if abs(r["bytes_per_answer"] - answer_bytes) > 1:
        raise RuntimeError(f"gRPC answers average {r['bytes_per_answer']:.0f} bytes, expected {answer_bytes}")
    return r
