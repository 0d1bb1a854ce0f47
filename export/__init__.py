"""Export a trained WARN checkpoint to a self-describing, verified ONNX file (and a Triton repository)."""
