#!/bin/sh
# postillon drops root to this unprivileged system user after binding ports.
set -eu
user="${1:-postillon}"
[ "$(id -u)" = 0 ] || exit 0
id "$user" >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin "$user"
