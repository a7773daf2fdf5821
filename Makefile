# `make demo` and `make test` each build the virtualenv from nothing when it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck check clean bench bench-save headline

$(STAMP): pyproject.toml requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

## Run the quickstart end to end against an embedded local S3 server (no AWS account).
demo: $(STAMP)
	$(BIN)/python examples/quickstart.py

## Run the test suite (starts its own moto S3 server on 127.0.0.1).
test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests examples $(wildcard benchmarks/*.py)
	$(BIN)/ruff format --check src tests examples $(wildcard benchmarks/*.py)

typecheck: $(STAMP)
	$(BIN)/mypy

check: lint typecheck test

clean:
	rm -rf $(VENV) .venv-s3tc build dist src/*.egg-info .pytest_cache .mypy_cache .hypothesis

## Benchmark aiodcp against s3torchconnector, s3fs, boto3 and local reads on a local S3 server
## (benchmarks/README.md). Builds benchmarks/.venv-bench and installs s3rver itself.
## BENCH_QUICK=1 for a few-minute run; BENCH_ARGS="--scenarios partial --repeats 5" for more.
bench:
	BENCH_QUICK=$(BENCH_QUICK) PYTHON=$(PYTHON) bash benchmarks/run.sh $(BENCH_ARGS)

## Saves: aiodcp against s3torchconnector's S3StorageWriter and FsspecWriter on s3rver
## (benchmarks/README.md, "Saves"). BENCH_ARGS="--repeats 3 --size-mib 1024" for more.
bench-save:
	PYTHON=$(PYTHON) bash benchmarks/run.sh save $(BENCH_ARGS)

## Every figure README.md quotes from a benchmark, in one go, with the command, revisions, date,
## server, machine and load beside each (benchmarks/headline.py; ~1 h on 2 cores). Uses the
## venv `make bench` builds. HEADLINE_ARGS="--repeats 5" or "--render-only" for more or less.
headline:
	BENCH_QUICK= PYTHON=$(PYTHON) BENCH_SCRIPT=headline.py bash benchmarks/run.sh $(HEADLINE_ARGS)
