# syntax=docker/dockerfile:1
# WARN inference service. GPU (default):  docker build -t warn-serve:gpu .
# CPU:  docker build --build-arg BASE_IMAGE=ubuntu:24.04 --build-arg VARIANT=cpu -t warn-serve:cpu .
#
# onnxruntime-gpu 1.31.1 is built against CUDA 13.x and cuDNN 9, so the GPU base is NVIDIA's
# CUDA 13 runtime image with cuDNN 9. Both bases are Ubuntu 24.04 (Python 3.12), so the venv
# built in the first stage runs unchanged in the second.
ARG BASE_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04

FROM ${BASE_IMAGE} AS build
ARG VARIANT=gpu
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
COPY docker/requirements-${VARIANT}.txt /tmp/requirements.txt
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir -r /tmp/requirements.txt

FROM ${BASE_IMAGE} AS runtime
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 warn \
    && useradd --system --uid 10001 --gid 10001 --no-create-home warn
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY service/ service/
COPY default_model/model.onnx default_model/model.onnx
# Settings come from the environment: WARN_* for the service (see README), UVICORN_* for uvicorn.
# One worker process per core by default (WARN_WORKERS overrides), sharing predictions in /tmp.
# Mount another model and point WARN_MODEL_PATH at it to serve your own.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    WARN_MODEL_PATH=/app/default_model/model.onnx \
    UVICORN_HOST=0.0.0.0 \
    UVICORN_PORT=8000 \
    WARN_GRPC_PORT=8001 \
    FORWARDED_ALLOW_IPS=*
USER 10001:10001
# HTTP (REST and the v2 protocol), and the v2 protocol over gRPC
EXPOSE 8000 8001
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/v2/health/ready' % os.environ['UVICORN_PORT'], timeout=2)"]
ENTRYPOINT ["python3", "-m", "service"]
