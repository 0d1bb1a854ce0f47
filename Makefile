# The README's two commands: `make serve` and `make test`. Both build .venv from scratch if needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: serve test lint default-model export-default profile

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
	$(VENV)/bin/uvicorn service.main:app --host $(HOST) --port $(PORT)

test: $(VENV)/.full
	$(PY) -m pytest -q

lint: $(VENV)/.full
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# Reproduces the committed default model (about 30 minutes on 2 CPU cores).
default-model: $(VENV)/.full
	$(VENV)/bin/warn-train --dataset cluttered-digits --depth 10 --width 2 --ad 3 --aw 4 \
		--epochs 8 --seed 0 --out runs/default
	cp runs/default/model.pt default_model/model.pt

profile: $(VENV)/.full
	$(VENV)/bin/warn-profile --depth 16 --width 4 --ad 3 --aw 4 --classes 10 --size 32
