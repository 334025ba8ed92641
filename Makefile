VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test lint bench
$(VENV)/bin/gateway: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
install: $(VENV)/bin/gateway
demo: install
	$(VENV)/bin/gateway demo
test: install
	$(VENV)/bin/pytest
lint: install
	$(VENV)/bin/ruff check gateway tests && $(VENV)/bin/ruff format --check gateway tests && $(VENV)/bin/mypy
bench: install
	$(VENV)/bin/python -m bench.run $(BENCH_ARGS)
