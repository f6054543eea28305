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
	touch $@

# Generated weights are never committed.
models: models/mlp/model.pt

models/mlp/model.pt: models/mlp/make_mlp.py $(VENV)/.installed
	$(BIN)/python models/mlp/make_mlp.py $@

serve: install models
	$(BIN)/ember serve --model-repository models --http_port $(PORT)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: install models lint
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) models/mlp/model.pt .mypy_cache .ruff_cache .pytest_cache
