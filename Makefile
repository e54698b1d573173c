# The two commands of the README: `make run` (set up, build, start the embedded demo)
# and `make test` (set up, run every test). `make setup` installs what both need
# beside the Rust toolchain: ONNX Runtime from the PyPI wheel and the Python test clients.

CARGO ?= cargo
CONFIG ?= deploy/local/aviary.toml

.PHONY: setup run build test test-rust test-python test-rules test-fuzz bench models

setup:
	scripts/setup.sh

run: setup
	$(CARGO) run --release -p aviary-cli --bin aviary -- serve --config $(CONFIG)

build:
	$(CARGO) build --workspace --bins

test: setup build test-rust test-python test-rules test-fuzz

# nextest runs each test in its own process (ONNX Runtime's environment is per process)
# and in parallel; plain cargo test is the fallback where nextest is not installed.
test-rust:
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(CARGO) nextest run --workspace --no-fail-fast; \
	else \
		$(CARGO) test --workspace --no-fail-fast; \
	fi

test-python:
	.venv/bin/python -m pytest tests/python -q

# The Prometheus alert rules of deploy/observability, checked and unit-tested with
# promtool (Debian's prometheus package, installed by setup).
test-rules:
	cd deploy/observability && promtool check rules alerts.yml && promtool test rules alerts.test.yml

# Every cargo-fuzz target of fuzz/ for 60 s (two at a time); a crash fails the run and
# leaves its input in fuzz/artifacts/. Longer runs: scripts/fuzz.sh --runs 10000000.
test-fuzz:
	scripts/fuzz.sh --seconds 60

# Prints the figures of docs/benchmarks.md (release build, several minutes). With
# KIT=DIR (the benchmark kit, see docs/benchmarks.md) the baselines run too.
bench: setup
	scripts/bench.sh $(if $(KIT),--kit $(KIT))
	scripts/bench_swap.sh

# Regenerates the demo and test models (needs: pip install -r scripts/requirements-models.txt).
models:
	python3 scripts/make_models.py --verify
