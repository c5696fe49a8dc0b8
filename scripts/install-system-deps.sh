#!/bin/sh
# Debian packages the tests and benchmarks use: real peers, not mocks.
#   swaks            a real SMTP client (STARTTLS, BDAT, pipelining), with
#   libnet-ssleay-perl   the Perl TLS module its STARTTLS needs
#   postfix          smtp-source / smtp-sink load tools and the benchmark peer
#   iproute2         `ip` for the loopback-only network namespace tests run in
#   dovecot-core     a real LMTP server (the MDA postillon hands local mail to),
#   dovecot-lmtpd      run in the foreground from a temp dir by testing/dovecot.py
#   msmtp            a real mail program (MUA-side SMTP client) for submission tests
#   opendkim-tools   an independent DKIM signer/verifier (opendkim-testmsg, -testkey)
#   postgresql       the shared queue of the cluster store, run from a temp dir by the tests
#   chromium         a real browser for the admin web page tests (driven by Playwright)
#   nsd              an authoritative DNS server for the DNSSEC-signed test zones (DANE),
#   unbound            with a validating resolver in front of it (the AD bit is real),
#   ldnsutils          and ldns-verify-zone to check a signed zone by hand
#   postgrey         a real Postfix policy server (greylisting) for [[policy_service]],
#                      run on loopback from a temp dir by tests/support/postgrey.py
# Installs only what is missing; needs root (CI runs as root). Without root it
# says what is missing and the tests that need it report the missing tool.
set -eu
need=""
command -v swaks >/dev/null 2>&1 || need="$need swaks"
# swaks only recommends Net::SSLeay, and recommends are not installed: without it
# swaks has no STARTTLS ("TLS not available: requires Net::SSLeay").
perl -MNet::SSLeay -e 1 >/dev/null 2>&1 || need="$need libnet-ssleay-perl"
command -v ip >/dev/null 2>&1 || need="$need iproute2"
[ -x /usr/sbin/smtp-source ] || need="$need postfix"
[ -x /usr/sbin/dovecot ] || need="$need dovecot-core"
[ -x /usr/lib/dovecot/lmtp ] || need="$need dovecot-lmtpd"
command -v msmtp >/dev/null 2>&1 || need="$need msmtp"
command -v opendkim-testmsg >/dev/null 2>&1 || need="$need opendkim-tools"
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || need="$need postgresql"
command -v chromium >/dev/null 2>&1 || need="$need chromium"
[ -x /usr/sbin/nsd ] || need="$need nsd"
[ -x /usr/sbin/unbound ] || need="$need unbound"
command -v ldns-verify-zone >/dev/null 2>&1 || need="$need ldnsutils"
[ -x /usr/sbin/postgrey ] || need="$need postgrey"
[ -z "$need" ] && exit 0
if [ "$(id -u)" != 0 ]; then
    echo "missing Debian packages:$need (run as root or: sudo apt-get install$need)" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
# Postfix must not configure or start a system instance on port 25.
echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
apt-get update -qq >/dev/null || true
# shellcheck disable=SC2086
apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends $need >/dev/null
