# postillon: `make run` starts the server on its embedded default; `make test`
# sets everything up and runs the whole suite. Both work on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint bench deps system-deps clean dist

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

deps: $(STAMP)

system-deps:
	./scripts/install-system-deps.sh
	./scripts/ensure-user.sh postillon

run: deps
	./scripts/ensure-user.sh postillon
	$(BIN)/postillon --config postillon.dev.toml check-config
	$(BIN)/postillon --config postillon.dev.toml serve

# Tests run inside a network namespace with only loopback when possible, so
# nothing can leak to the machine's resolver or the internet.
test: deps system-deps lint
	./scripts/run-tests.sh $(BIN)/pytest $(PYTEST_ARGS)

lint: deps
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check --quiet src tests bench
	$(BIN)/mypy

# Large and wide messages (bench/big_bench.py): about two minutes with these.
BIG_BENCH_ARGS ?= --reps 3 --big-n 50 --wide-rcpts 1000

bench: deps system-deps
	$(BIN)/python bench/accept_bench.py $(BENCH_ARGS)
	$(BIN)/python bench/cluster_bench.py $(CLUSTER_BENCH_ARGS)
	$(BIN)/python bench/tls_bench.py $(TLS_BENCH_ARGS)
	$(BIN)/python bench/pipeline_bench.py $(PIPELINE_BENCH_ARGS)
	$(BIN)/python bench/maildir_bench.py $(MAILDIR_BENCH_ARGS)
	$(BIN)/python bench/big_bench.py $(BIG_BENCH_ARGS)
	$(BIN)/python bench/backlog_bench.py $(BACKLOG_BENCH_ARGS)

# The wheel and sdist an operator installs (`pipx install dist/postillon-*.whl`):
# docs/install.md. The sdist is built first and the wheel from it.
dist: deps
	rm -rf dist
	$(BIN)/python -m build --outdir dist

clean:
	rm -rf $(VENV) dist build var .pytest_cache .mypy_cache .ruff_cache
