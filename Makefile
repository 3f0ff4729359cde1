# The two entry points of the README: `make demo` and `make test`.
# Everything is installed into .venv/ (and, for the tracker tests, Debian's opentracker).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: bench demo test lint typecheck releasenotes unit integration docs system-packages clean

$(STAMP): setup.cfg requirements.txt test-requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt -r test-requirements.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

system-packages:
	tools/install-system-packages

demo: $(STAMP)
	$(BIN)/nova-torrent-images demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The typed packages (mypy-files.txt), as os-brick checks its own.
typecheck: $(STAMP)
	$(BIN)/mypy $$(cat mypy-files.txt)

releasenotes: $(STAMP)
	$(BIN)/reno lint

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

integration: $(STAMP) system-packages
	$(BIN)/pytest -q tests/integration

docs: $(STAMP)
	$(BIN)/pip install --quiet -r doc/requirements.txt
	$(BIN)/sphinx-build -W --keep-going -b html doc/source doc/build/html

test: $(STAMP) system-packages lint typecheck releasenotes docs
	$(BIN)/pytest -q -ra tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

bench: $(STAMP) system-packages
	$(BIN)/pip install --quiet -r bench/requirements.txt
	$(BIN)/python bench/run_all.py $(BENCH_ARGS)
