"""The peer for benchmark rows 6 and 11: KServe's Python ModelServer serving the same ONNX file on onnxruntime,
over HTTP on PORT and over gRPC on PORT + 1.

Runs in a venv of its own (kserve pins its own FastAPI): `make bench` builds build/kserve-venv.

    python bench/kserve_server.py MODEL.onnx NAME PORT THREADS [cuda]

With `cuda` (bench.gpu), onnxruntime runs on the CUDA provider with TF32 off, as the service does.
"""

from __future__ import annotations

import sys
import uuid

import numpy as np
import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer


class OnnxModel(Model):
    def __init__(self, name: str, path: str, threads: int, cuda: bool = False) -> None:
        super().__init__(name)
        self.path, self.threads, self.cuda = path, threads, cuda
        self.load()

    def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        cuda = [("CUDAExecutionProvider", {"use_tf32": 0})] if self.cuda else []
        self.session = ort.InferenceSession(self.path, options, providers=[*cuda, "CPUExecutionProvider"])
        self.names = [o.name for o in self.session.get_outputs()]
        self.ready = True
        return True

    def predict(self, payload: InferRequest, headers: dict | None = None) -> InferResponse:
        x = np.ascontiguousarray(payload.inputs[0].as_numpy(), dtype=np.float32)
        wanted = [o.name for o in payload.request_outputs] if payload.request_outputs else self.names
        results = dict(zip(self.names, self.session.run(None, {"image": x})))
        outputs = []
        for name in wanted:
            out = InferOutput(name=name, shape=list(results[name].shape), datatype="FP32")
            out.set_data_from_numpy(results[name], binary_data=True)
            outputs.append(out)
        return InferResponse(response_id=payload.id or uuid.uuid4().hex, model_name=self.name, infer_outputs=outputs)


if __name__ == "__main__":
    path, name, port, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    cuda = sys.argv[5:] == ["cuda"]
    ModelServer(http_port=port, grpc_port=port + 1, enable_grpc=True, workers=1, enable_latency_logging=False).start(
        [OnnxModel(name, path, threads, cuda)]
    )
