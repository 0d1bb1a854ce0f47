"""The WARN inference service: FastAPI on onnxruntime."""
