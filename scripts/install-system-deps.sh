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
#   systemd          systemd-analyze verify/security on postillon's unit file (issue 17)
#   logrotate        the logrotate snippet rotated for real against a running server
#   pebble           Let's Encrypt's ACME test server: the CA the automatic-certificate
#                      tests obtain and renew certificates from (issue 17)
#   rspamd           a real spam filter behind the milter client (its proxy worker in milter mode)
#   opendkim         a real DKIM-verifying milter (adds Authentication-Results)
#   clamav-daemon    clamd, a real virus scanner (signature DB made offline by the tests),
#   clamav-milter      and its milter, so the EICAR string is rejected through the milter client
#   python3-milter   pymilter on Debian's libmilter: the reference milter library for protocol tests
#   postgrey         a real Postfix policy server (greylisting) for [[policy_service]],
#                      run on loopback from a temp dir by tests/support/postgrey.py
#   strace           counts the server's fsync/fdatasync calls per message (tests/integration/
#                      test_fsync_per_message.py) and the benchmark's durability check
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
command -v systemd-analyze >/dev/null 2>&1 || need="$need systemd"
command -v logrotate >/dev/null 2>&1 || [ -x /usr/sbin/logrotate ] || need="$need logrotate"
command -v pebble >/dev/null 2>&1 || [ -x /usr/bin/pebble ] || need="$need pebble"
command -v rspamd >/dev/null 2>&1 || need="$need rspamd"
[ -x /usr/sbin/opendkim ] || need="$need opendkim"
[ -x /usr/sbin/clamd ] || need="$need clamav-daemon"
[ -x /usr/sbin/clamav-milter ] || need="$need clamav-milter"
/usr/bin/python3 -c 'import Milter' >/dev/null 2>&1 || need="$need python3-milter"
[ -x /usr/sbin/postgrey ] || need="$need postgrey"
command -v strace >/dev/null 2>&1 || need="$need strace"
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
