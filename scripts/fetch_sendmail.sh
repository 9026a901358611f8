#!/usr/bin/env bash
# Fetches Debian's Sendmail packages and unpacks them for the Sendmail tests
# (tests/sendmail_fixture.py), without installing them: sendmail-bin would remove postfix.
#   .cache/sendmail/*.deb   the packages (apt-get download)
#   .cache/sendmail/root/   their files (dpkg -x): the daemon, the cf macros, m4, libwrap
# Idempotent: silent and quick when the tree is there already. Needs apt-get and dpkg;
# runs apt-get update (as root) only when apt knows no sendmail-bin candidate.
# Environment: MQPOLICY_SENDMAIL_CACHE (default: .cache/sendmail in the repository).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

CACHE=${MQPOLICY_SENDMAIL_CACHE:-.cache/sendmail}
ROOT=$CACHE/root
PACKAGES=(sendmail-bin sendmail-cf m4 libwrap0)

say() { printf 'fetch_sendmail: %s\n' "$*" >&2; }

if [[ -f $ROOT/usr/libexec/sendmail/sendmail && -f $ROOT/usr/share/sendmail/cf/m4/cf.m4 ]]; then
    exit 0
fi
for tool in apt-get apt-cache dpkg; do
    command -v "$tool" >/dev/null || { say "$tool not found"; exit 1; }
done

if ! apt-cache show sendmail-bin >/dev/null 2>&1; then
    if ((EUID != 0)); then
        say "apt knows no sendmail-bin and only root can run apt-get update"
        exit 1
    fi
    apt-get update -qq
fi

mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)
ROOT=$CACHE/root
staging=$(mktemp -d "$CACHE/unpack-XXXXXX")
trap 'rm -rf "$staging"' EXIT
chmod 0755 "$CACHE" "$staging"

say "downloading ${PACKAGES[*]} into $CACHE"
rm -f "$CACHE"/*.deb
log=$(mktemp)
# As root, apt-get warns that its _apt user cannot write the directory: that is fine.
if ! (cd "$CACHE" && apt-get download "${PACKAGES[@]}") >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    say "apt-get download failed"
    exit 1
fi
rm -f "$log"
for deb in "$CACHE"/*.deb; do
    dpkg -x "$deb" "$staging"
done
rm -rf "$ROOT"
mv "$staging" "$ROOT"
trap - EXIT
say "unpacked into $ROOT"
