# Two commands set everything up on a fresh machine: `make quickstart` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: quickstart test lint bench clean

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c requirements.lock -e '.[test]'
	touch $(STAMP)

quickstart: $(STAMP)
	$(BIN)/mixer quickstart

# Two test processes, each test file whole in one of them (its module-scoped clusters and runs stay shared): the
# suite waits on clusters, kills and timeouts often enough that a second process fills the idle time. Files go out
# in collection order (tests/conftest.py puts the longest first), not pytest-xdist's default of most tests first.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python bench/all.py

clean:
	rm -rf $(VENV) out
