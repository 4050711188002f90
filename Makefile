.PHONY: install up test lint

install:
	./scripts/install.sh

# Runs the whole marketplace locally with a sample job (Ctrl-C stops everything).
up: install
	gpumarket up

# Lint, then the whole test suite (starts its own NATS, PostgreSQL, S3 and podman).
test: install
	python3 -m ruff check .
	python3 -m pytest -q

lint:
	python3 -m ruff check .
	python3 -m ruff format --check .
