# Two commands set everything up on a fresh machine: `make quickstart` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: quickstart test lint bench clean

# Modules are compiled after the install on every core (pip compiles one file at a time), and before any test: the
# suite starts many fresh processes at once, which would otherwise all compile torch and Ray on first import (and
# every time, where PYTHONDONTWRITEBYTECODE is set). What no run imports is left to Python, a third of the time:
# packages' own tests, pip's vendored copies, RLlib, Serve, moto's other AWS services. A file that does not compile
# (a package's Python 2 leftovers) is left to Python too, as pip leaves it.
MOTO_USED := core|s3|s3bucket_path|sts|iam|events|cloudwatch|utilities|moto_server|moto_api|settings|backends
UNUSED_MOTO := /moto/(?!($(MOTO_USED)|backend_index|server|__init__)\b)
UNUSED := /(tests?|ray/rllib|ray/serve|pip/_vendor|sympy/physics|pygments/lexers)/|$(UNUSED_MOTO)
$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --no-compile -c requirements.lock -e '.[test]'
	$(BIN)/python -m compileall -q -j 0 -x '$(UNUSED)' \
		$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))') > /dev/null || true
	touch $(STAMP)

quickstart: $(STAMP)
	$(BIN)/mixer quickstart

# Three test processes, each test file whole in one of them (its module-scoped clusters and runs stay shared): the
# suite waits on clusters, kills and timeouts often enough that more processes than cores fill the idle time (on 2
# cores: 6 min 43 s against 7 min 22 s with two). Files go out in collection order (tests/conftest.py puts the
# longest first), not pytest-xdist's default of most tests first.
TEST_WORKERS ?= 3

test: $(STAMP)
	$(BIN)/python -m compileall -q -j 0 pipeline data_prep > /dev/null
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python bench/all.py

clean:
	rm -rf $(VENV) out
