# Two commands set everything up: `make run` and `make test` (see README.md).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run cluster test test-slow test-deps lint fmt watcher bench bench-peer bench-transport clean

$(STAMP): pyproject.toml client/pyproject.toml
	@$(PY) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
	  echo "make: LionMQ needs Python 3.11 or newer as $(PY) (on Debian: apt-get install python3)" >&2; \
	  exit 1; }
	@# Debian's python3 lacks ensurepip until python3-venv is installed: `-m venv` fails then.
	@test -x $(BIN)/python || $(PY) -m venv $(VENV) || { rm -rf $(VENV); \
	  echo "make: $(PY) cannot create a virtual environment (its venv or ensurepip module is" \
	    "missing): on Debian, apt-get install python3-venv" >&2; \
	  exit 1; }
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ./client -e '.[dev,bench]'
	touch $(STAMP)

run: $(STAMP)
	mkdir -p data
	$(BIN)/python -m app

watcher: $(STAMP)
	$(BIN)/python -m watcher

# 2 shards x (primary + backup) and the watcher on 127.0.0.1, on one SQLite file in a temporary
# directory (CLUSTER_DATA=dir keeps it); prints the URLs, the secrets it generated and how to
# see a failover; Ctrl-C stops everything (scripts/local_cluster.py).
CLUSTER_PORTS ?= 8001,8002,8003,8004
CLUSTER_WATCHER_PORT ?= 8080
CLUSTER_DATA ?=

cluster: $(STAMP)
	$(BIN)/python scripts/local_cluster.py --ports $(CLUSTER_PORTS) \
	  --watcher-port $(CLUSTER_WATCHER_PORT) $(if $(CLUSTER_DATA),--data $(CLUSTER_DATA))

# Debian packages the suite uses, installed with apt when missing (fresh containers and CI run
# as root, where there is no sudo): chromium for the browser test, docker-compose (1.29) to
# validate the compose files, prometheus for promtool (checks and unit-tests the alerting rules).
# Each as package:command, the command that tells it is installed. One `apt-get update`, then one
# install of whatever is missing.
TEST_PACKAGES := chromium:chromium docker-compose:docker-compose prometheus:promtool

test-deps:
	@missing=""; \
	for pair in $(TEST_PACKAGES); do \
	  command -v $${pair#*:} >/dev/null 2>&1 || missing="$$missing $${pair%%:*}"; \
	done; \
	[ -z "$$missing" ] || { \
	  echo "installing Debian's$$missing for the tests"; \
	  if [ "$$(id -u)" = 0 ]; then sudo=""; else sudo=sudo; fi; \
	  $$sudo apt-get update -qq && \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; }

# Two workers, a test file each at a time (a file's module-scoped nodes stay in one worker): most
# tests wait on node processes, so two cores run the suite in about two thirds of the time.
test: $(STAMP) test-deps
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

# The long versions of the chaos and scale tests (`-m slow`); `make test` runs the short ones.
test-slow: $(STAMP) test-deps
	$(BIN)/python -m pytest -q -m slow

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
