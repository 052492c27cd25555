# Two commands set everything up: `make run` and `make test` (see README.md).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint fmt watcher bench bench-peer bench-transport chromium clean

$(STAMP): pyproject.toml client/pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ./client -e '.[dev,bench]'
	touch $(STAMP)

run: $(STAMP)
	mkdir -p data
	$(BIN)/python -m app

watcher: $(STAMP)
	$(BIN)/python -m watcher

# The browser test drives Debian's Chromium; install it from apt when it is missing.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium for the browser test"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

test: $(STAMP) chromium
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# LionMQ alone; then side by side with RabbitMQ and NATS JetStream (their servers installed
# from apt when missing, run on loopback from temp dirs); then the client's HTTP senders.
bench: $(STAMP)
	$(BIN)/python -m bench

bench-peer: $(STAMP)
	$(BIN)/python -m bench --peer all

bench-transport: $(STAMP)
	$(BIN)/python -m bench transport

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
