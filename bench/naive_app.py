"""The baseline most users would otherwise write: FastAPI calling PyTorch eager per request, no batching,
on the GPU where torch sees one.

WARN_CHECKPOINT=default_model/model.pt uvicorn bench.naive_app:app
"""

from __future__ import annotations

import io
import os

import numpy as np
import torch
from fastapi import FastAPI, Request
from PIL import Image

from models.checkpoint import load

torch.set_num_threads(int(os.environ.get("TORCH_THREADS", "0")) or torch.get_num_threads())
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
model = load(os.environ.get("WARN_CHECKPOINT", "default_model/model.pt"))[0].to(device)
app = FastAPI()


@app.post("/predict")
async def predict(request: Request) -> dict:
    img = Image.open(io.BytesIO(await request.body())).convert("RGB").resize(model.config.input_size[::-1])
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)[None].to(device)
    with torch.inference_mode():
        probs = model(x).probabilities[0].cpu()
    top = torch.topk(probs, 5)
    names = model.config.class_names
    return {"top_k": [{"label": names[i], "probability": float(p)} for p, i in zip(top.values, top.indices)]}
