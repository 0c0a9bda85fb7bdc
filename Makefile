# The two quick-start commands: `make demo` and `make test`. Both build .venv from nothing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test bench clean chromium

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $(VENV)/.runtime $@

demo: $(VENV)/.runtime
	$(BIN)/stopsign demo

# The browser test drives Debian's chromium (Playwright never downloads one); CI runs as root with apt access.
chromium:
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)

# lint-imports: the layers of docs/ARCHITECTURE.md (pyproject.toml's [tool.importlinter]); a back edge fails.
test: $(VENV)/.dev chromium
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q --durations=10

bench: $(VENV)/.dev
	$(BIN)/python bench/bench_speed.py

clean:
	rm -rf $(VENV) runs build src/*.egg-info
