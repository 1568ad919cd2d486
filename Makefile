# dpops: `make demo` runs one private fine-tune end to end; `make test` runs the tests.
# Both install what they need into .venv first.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: install data demo test budget ui lint clean

install: $(VENV)/.installed

# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

# The demo data is DVC-tracked; its local remote (dvc-remote/) ships in the repository.
data: install
	$(BIN)/dvc pull --quiet
	$(BIN)/dvc repro --quiet

demo: data
	$(BIN)/dpops run configs/jobs/sst2_lora.yaml

test: data
	$(BIN)/python -m pytest

budget: install
	$(BIN)/dpops budget

ui: install
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(abspath .dpops)/mlflow.db --port 5000

lint: install
	$(BIN)/ruff check src tasks flows tests benchmarks

clean:
	rm -rf .dpops
