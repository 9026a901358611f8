#!/usr/bin/env bash
# The whole suite while every core is kept busy: one busy loop per core (bounded: each stops
# by itself after an hour, and all are stopped by PID when the suite ends, however it ends).
# Usage: scripts/test_under_load.sh VENV [pytest args...]
set -uo pipefail
venv=${1:?usage: test_under_load.sh VENV [pytest args...]}
shift
cores=$(nproc)
pids=()
stop_loops() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null; done
}
trap stop_loops EXIT
for _ in $(seq "$cores"); do
    timeout 3600 python3 -c 'while True: pass' &
    pids+=($!)
done
echo "test-loaded: $cores busy loops (pids ${pids[*]}), load before the suite: $(cut -d' ' -f1-3 /proc/loadavg)"
start=$(date +%s)
"$venv/bin/pytest" "$@"
rc=$?
echo "test-loaded: pytest exit $rc after $(( $(date +%s) - start )) s, load: $(cut -d' ' -f1-3 /proc/loadavg)"
exit "$rc"
