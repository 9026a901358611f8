#!/usr/bin/env bash
# Installs what `make run` and `make test` need, and nothing when it is all there already:
#   1. Debian packages (apt-get only when one is missing; never starts the system Postfix);
#   2. the project venv in .venv from the lock file, every package pinned and hashed
#      (`pip install --require-hashes -r requirements/test.lock`, then the project itself
#      with `pip install --no-deps -e .`); redone only when the lock, pyproject.toml or the
#      venv's Python changed. `make lock` writes the lock.
# Safe to run as often as you like; silent when there is nothing to do.
# With --latest: the venv made anew with today's newest release of everything
# (`pip install -U -e '.[test]'`, no lock), every time (`make test-latest`).
# Environment: PYTHON (interpreter for a new venv, default python3), VENV (default .venv),
# LOCK (default requirements/test.lock).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

export DEBIAN_FRONTEND=noninteractive
export PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
LOCK=${LOCK:-requirements/test.lock}
LATEST=0
case ${1:-} in
    "") ;;
    --latest) LATEST=1 ;;
    *) printf 'usage: %s [--latest]\n' "$0" >&2; exit 2 ;;
esac
APT_PACKAGES=(build-essential python3-dev python3-venv libmilter-dev postfix redis-server swaks)

say() { printf 'bootstrap: %s\n' "$*" >&2; }

missing_apt_packages() {
    # One dpkg query for all of them; "ii" is the only state that counts as installed
    # (a removed package keeps "rc" with its config files).
    local pkg status
    for pkg in "${APT_PACKAGES[@]}"; do
        status=$(dpkg-query -W -f='${db:Status-Abbrev}' "$pkg" 2>/dev/null || true)
        [[ $status == ii* ]] || printf '%s\n' "$pkg"
    done
}

install_apt_packages() {
    local -a missing
    mapfile -t missing < <(missing_apt_packages)
    ((${#missing[@]})) || return 0
    if ((EUID != 0)); then
        say "missing Debian packages: ${missing[*]} (run this script as root to install them)"
        exit 1
    fi
    say "installing Debian packages: ${missing[*]}"
    # Postfix: no questions, no main.cf of its own (tests run private instances).
    debconf-set-selections <<'EOF'
postfix postfix/main_mailer_type select No configuration
postfix postfix/mailname string localhost
EOF
    # Keep the package scripts from starting the system postfix and redis-server:
    # a policy-rc.d that denies every start, unless the machine already has one.
    local policy_rc=/usr/sbin/policy-rc.d created_policy_rc=0
    if [[ ! -e $policy_rc ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy_rc"
        chmod 0755 "$policy_rc"
        created_policy_rc=1
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        "${missing[@]}" >/dev/null
    if ((created_policy_rc)); then
        rm -f "$policy_rc"
        trap - EXIT
    fi
}

venv_stamp() {
    # What the installed venv depends on: the lock, the project metadata, the interpreter.
    {
        sha256sum "$LOCK" pyproject.toml
        "$VENV/bin/python" -c 'import sys; print(sys.version)'
    } | sha256sum | cut -d' ' -f1
}

pip_quietly() {
    # pip in the venv; its output (the build backend's warnings among it) is shown only
    # when it fails.
    local log
    log=$(mktemp)
    if ! "$VENV/bin/python" -m pip "$@" >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        say "pip $* failed"
        exit 1
    fi
    rm -f "$log"
}

install_venv() {
    local stamp_file="$VENV/.mqpolicy-bootstrap"
    if [[ -x $VENV/bin/python && -x $VENV/bin/mqpolicy && -f $stamp_file ]] \
        && "$VENV/bin/python" -c '' 2>/dev/null \
        && [[ $(<"$stamp_file") == "$(venv_stamp)" ]]; then
        return 0
    fi
    if [[ -e $VENV ]]; then
        # what the lock does not list must not stay behind from an earlier install
        say "making $VENV anew"
        "$PYTHON" -m venv --clear "$VENV"
    else
        say "creating $VENV"
        "$PYTHON" -m venv "$VENV"
    fi
    say "installing $LOCK and the project into $VENV"
    pip_quietly install -q --require-hashes --no-deps -r "$LOCK"
    pip_quietly install -q --no-deps -e .
    pip_quietly check
    venv_stamp >"$stamp_file"
}

install_latest_venv() {
    say "making $VENV anew with the newest releases (pip install -U -e '.[test]')"
    "$PYTHON" -m venv --clear "$VENV"
    pip_quietly install -q -U pip
    pip_quietly install -q -U -e '.[test]'
    "$VENV/bin/python" -m pip list --format=freeze >"$VENV/installed.txt"
    say "installed: $(grep -iE '^(redis|hiredis|dnspython|pymilter|pyyaml|pytest|mypy|ruff)==' \
        "$VENV/installed.txt" | tr '\n' ' ')"
}

install_apt_packages
if ((LATEST)); then
    install_latest_venv
else
    install_venv
fi
bash scripts/fetch_sendmail.sh || say "Sendmail packages not fetched: the Sendmail tests will try again or skip"
