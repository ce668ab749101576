#!/bin/sh
# `make debian-tools`: installs the Debian packages named on the command line with apt-get,
# as root or through sudo that asks no password. The tests that run Prometheus, the Go
# client and the Java client use them. Where they cannot be installed those tests skip,
# naming the package, except under CI (CI set): a run that is to land must run them, so
# there this fails instead.
set -u

give_up() {
	echo "$1: the Prometheus, Go and Java tests will skip" >&2
	[ -z "${CI:-}" ] || exit 1
	exit 0
}

# Installed means "ii": a package removed with its config files kept still answers dpkg -s.
installed=$(dpkg-query -W -f='${db:Status-Abbrev}\n' "$@" 2>/dev/null | grep -c '^ii ')
[ "$installed" -eq "$#" ] && exit 0

if [ "$(id -u)" = 0 ]; then
	run=
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
	run=sudo
else
	give_up "not root and no password-less sudo"
fi

# A fresh machine's unattended upgrades may hold dpkg's lock for a while: wait for it.
apt() {
	$run env DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=300 "$@" >/dev/null
}
apt install -y --no-install-recommends "$@" \
	|| { apt update && apt install -y --no-install-recommends "$@"; } \
	|| give_up "apt-get could not install $*"

# Where services may start, Debian's prometheus package starts a system-wide server on
# :9090; the tests start their own on a free port, so it is stopped and left disabled.
$run sh -c 'systemctl disable --now prometheus || service prometheus stop' >/dev/null 2>&1 || true
