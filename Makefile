# make run    start the policy server on the embedded memory store with conf/mqpolicy.yaml
# make test   install everything (Debian packages, .venv) and run the whole suite
# make demo   a private Postfix + sink + mqpolicy, a realistic mix of mail, a report
# make bench  policy server throughput and latency, memory and Redis stores (see README)
# make bench-e2e / bench-milter  through a private Postfix / the milter against its floor
SHELL := /bin/bash
VENV ?= .venv
CONFIG ?= conf/mqpolicy.yaml

.PHONY: run test bench bench-e2e bench-milter demo bootstrap

bootstrap:
	@bash scripts/bootstrap.sh

run: bootstrap
	$(VENV)/bin/mqpolicy serve -c $(CONFIG)

# Runs pytest, ruff and mypy even when an earlier one fails, then fails if any did.
# pytest's exit code 5 ("no tests collected") is a failure here.
test: bootstrap
	@failed=(); \
	$(VENV)/bin/pytest; rc=$$?; \
	if [[ $$rc -eq 5 ]]; then echo "make test: pytest collected no tests" >&2; fi; \
	[[ $$rc -eq 0 ]] || failed+=(pytest); \
	$(VENV)/bin/ruff check mqpolicy tests bench || failed+=(ruff); \
	$(VENV)/bin/mypy --strict mqpolicy || failed+=(mypy); \
	if (( $${#failed[@]} )); then echo "make test: FAILED: $${failed[*]}" >&2; exit 1; fi

bench: bootstrap
	$(VENV)/bin/python bench/policy_bench.py --baseline --duration 5 --concurrency 1,8,64 --markdown

demo: bootstrap
	$(VENV)/bin/mqpolicy demo

bench-e2e: bootstrap
	$(VENV)/bin/python bench/postfix_e2e_bench.py

bench-milter: bootstrap
	$(VENV)/bin/python bench/milter_bench.py --clients 1,4 --eom-only --stall
