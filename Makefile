VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test lint bench compat mutate asyncapi
# `make compat`: the test files that talk to Kafka, against each release below (real Apache
# Kafka from Maven Central; needs Java 17+ and Maven). The CI pin is kafka_cluster.DEFAULT_VERSION.
COMPAT_VERSIONS ?= 3.9.2 4.4.0
COMPAT_TESTS ?= tests/test_ingress.py tests/test_ingress_outage.py tests/test_fuzz.py \
	tests/test_logs.py tests/test_serve_cli.py tests/test_allowlist_refresh.py \
	tests/test_producer_process.py tests/test_faults.py tests/test_topics.py tests/test_ops.py \
	tests/test_tagsync_worker.py tests/test_tagsync_auth.py tests/test_cluster_faults.py \
	tests/test_producer_stall.py tests/test_sink.py
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
# The AsyncAPI project's parser, which tests/test_asyncapi.py runs (needs Node.js and npm)
asyncapi:
	cd .ci/asyncapi && npm ci --silent --no-audit --no-fund
bench: install
	$(PY) -m pip install -q -e '.[test,bench]'
	$(VENV)/bin/python -m bench.run $(BENCH_ARGS)

# Mutation testing of the modules that hold the promises ([tool.mutmut] in pyproject.toml):
# slow, not in CI. Survivors are listed in mutation-report.txt; see docs/testing.md.
# `make mutate MUTATE_ONLY=gateway/core/trust.py` (one or more files) runs only their mutants.
MUTATE_TIMEOUT ?= 7200
MUTATE_CHILDREN ?= 2
MUTATE_ONLY ?=
MUTATE_MODULES := $(foreach f,$(MUTATE_ONLY),$(subst /,.,$(basename $(f))))
mutate: install
	$(PY) -m pip install -q -e '.[test,mutation]'
	rm -rf mutants
	GATEWAY_TEST_KAFKA=mock timeout $(MUTATE_TIMEOUT) nice -n 10 $(VENV)/bin/mutmut run \
		--max-children $(MUTATE_CHILDREN) $(foreach m,$(MUTATE_MODULES),'$(m).*')
	$(VENV)/bin/mutmut results --all true | grep -F $(foreach m,$(or $(MUTATE_MODULES),gateway),-e '$(m).') \
		> mutation-report.txt
	@sed -E 's/^ *(gateway[a-z_.]*)\.x[^:]*: (.*)$$/\1 \2/' mutation-report.txt | sort | uniq -c \
		| awk '{n=$$1; $$1=""; print $$0 ":", n}'
compat: install
	@fail=0; for v in $(COMPAT_VERSIONS); do \
	  echo "== Apache Kafka $$v"; \
	  GATEWAY_TEST_KAFKA=apache GATEWAY_TEST_KAFKA_VERSION=$$v \
	    $(VENV)/bin/pytest -q $(COMPAT_TESTS) $(COMPAT_ARGS) || fail=1; \
	done; exit $$fail
