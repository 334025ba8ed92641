VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test lint bench mutate
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

# Mutation testing of the modules that hold the promises ([tool.mutmut] in pyproject.toml):
# slow, not in CI. Survivors are listed in mutation-report.txt; see docs/testing.md.
MUTATE_TIMEOUT ?= 3600
mutate: install
	$(PY) -m pip install -q -e '.[test,mutation]'
	rm -rf mutants
	GATEWAY_TEST_KAFKA=mock timeout $(MUTATE_TIMEOUT) $(VENV)/bin/mutmut run --max-children 2
	$(VENV)/bin/mutmut results --all true > mutation-report.txt
	@sed -E 's/^ *(gateway[a-z_.]*)\.x[^:]*: (.*)$$/\1 \2/' mutation-report.txt | sort | uniq -c \
		| awk '{n=$$1; $$1=""; print $$0 ":", n}'
