# make run    start the policy server on the embedded memory store with conf/mqpolicy.yaml
# make test   install everything (Debian packages, .venv from requirements/test.lock) and run
#             the whole suite, ruff, mypy and lint-imports: the lock pins every direct
#             dependency at the lower bound of its range in pyproject.toml, so this tests the
#             low end
# make test-latest  the same checks in .venv-latest, made anew with today's newest release
#             of everything (pip install -U -e '.[test]', no lock): the high end
# make test-loaded  the suite (pytest) while a busy loop per core keeps the machine loaded:
#             no test may depend on the machine's speed
# make lock   rewrite requirements/test.lock from pyproject.toml (uv pip compile, hashed,
#             lowest direct versions; the dependencies' own dependencies at their newest)
# make demo   a private Postfix + sink + mqpolicy, a realistic mix of mail, a report
# make bench  policy server throughput and latency, memory and Redis stores (see README)
# make bench-e2e / bench-milter  through a private Postfix / the milter against its floor
SHELL := /bin/bash
VENV ?= .venv
LATEST_VENV := .venv-latest
CONFIG ?= conf/mqpolicy.yaml
LOCK := requirements/test.lock
UV_VERSION := 0.13.9

.PHONY: run test test-loaded test-latest lock bench bench-e2e bench-milter demo bootstrap bootstrap-latest

bootstrap:
	@VENV=$(VENV) LOCK=$(LOCK) bash scripts/bootstrap.sh

bootstrap-latest:
	@VENV=$(LATEST_VENV) bash scripts/bootstrap.sh --latest

# The lock keeps environment markers (--universal) and is tested on Python 3.11 (Debian 12's);
# direct dependencies at the lower bound of their range, their own dependencies at their
# newest that day, every file's hash; uv itself pinned, in .venv-uv.
lock:
	@python3 -m venv .venv-uv && .venv-uv/bin/python -m pip install -q 'uv==$(UV_VERSION)'
	.venv-uv/bin/uv pip compile pyproject.toml --extra test --universal \
		--resolution lowest-direct --upgrade --generate-hashes \
		--custom-compile-command 'make lock' --output-file $(LOCK)

run: bootstrap
	$(VENV)/bin/mqpolicy serve -c $(CONFIG)

# Runs pytest, ruff, mypy and lint-imports (the layers and contracts in pyproject.toml) even
# when an earlier one fails, then fails if any did.
# pytest's exit code 5 ("no tests collected") is a failure here.
define run_checks
	@failed=(); \
	$(VENV)/bin/pytest; rc=$$?; \
	if [[ $$rc -eq 5 ]]; then echo "make $@: pytest collected no tests" >&2; fi; \
	[[ $$rc -eq 0 ]] || failed+=(pytest); \
	$(VENV)/bin/ruff check mqpolicy tests bench || failed+=(ruff); \
	$(VENV)/bin/mypy --strict mqpolicy || failed+=(mypy); \
	$(VENV)/bin/lint-imports || failed+=(lint-imports); \
	if (( $${#failed[@]} )); then echo "make $@: FAILED: $${failed[*]}" >&2; exit 1; fi
endef

test: bootstrap
	$(run_checks)

test-loaded: bootstrap
	@bash scripts/test_under_load.sh $(VENV)

test-latest: VENV = $(LATEST_VENV)
test-latest: bootstrap-latest
	$(run_checks)

bench: bootstrap
	$(VENV)/bin/python bench/policy_bench.py --baseline --duration 5 --concurrency 1,8,64 --markdown

demo: bootstrap
	$(VENV)/bin/mqpolicy demo

bench-e2e: bootstrap
	$(VENV)/bin/python bench/postfix_e2e_bench.py

bench-milter: bootstrap
	$(VENV)/bin/python bench/milter_bench.py --clients 1,4 --eom-only --stall
