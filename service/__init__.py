"""The WARN inference service: FastAPI on onnxruntime."""

__version__ = "0.1.0"
