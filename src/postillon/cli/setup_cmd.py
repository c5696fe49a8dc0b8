"""``postillon setup``: one command for a new server (provision/setup.py does the work).

Prints what it changed (or, with ``--dry-run``, would change), what was already in
place, what must be done by hand, the admin's password (once), the DNS records to
publish and the next commands. Exit codes: 0 done, 1 a step failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from postillon.config.loader import ConfigError
from postillon.core.address import AddressError, domain_to_ascii
from postillon.dnsrecords.records import plan_for, served_policy
from postillon.inbound.accounts import AccountError
from postillon.provision.config_text import LETS_ENCRYPT, SetupOptions
from postillon.provision.setup import Layout, Report, run_setup
from postillon.signing.keys import KeyStoreError, key_store_from_config


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "setup",
        help="set up a new server: config, keys, admin account, sendmail, systemd unit",
        description="Write /etc/postillon/postillon.toml (ports 25, 465, 587; the domains; "
        "TLS from ACME; the admin page on loopback), make the service user, the data "
        "directory, DKIM Ed25519 and RSA keys and a first mail account for the admin "
        "(its password is printed once), register postillon's sendmail as "
        "/usr/sbin/sendmail, install the systemd unit, and print the DNS records to "
        "publish. Running it again changes nothing; an existing config is kept "
        "unless --force.",
    )
    p.add_argument("--hostname", required=True, help="this server's name (MX), e.g. mx.example.org")
    p.add_argument(
        "--domain",
        action="append",
        required=True,
        metavar="DOMAIN",
        help="a domain to receive mail for (repeat for more)",
    )
    p.add_argument(
        "--admin-email", help="the admin's mail account (default: postmaster@ the first domain)"
    )
    p.add_argument("--root", type=Path, help="do everything under this directory")
    p.add_argument("--dry-run", action="store_true", help="say what would change; change nothing")
    p.add_argument("--force", action="store_true", help="replace an existing config")
    p.add_argument(
        "--acme-directory",
        default=LETS_ENCRYPT,
        metavar="URL",
        help="the ACME CA's directory URL (default: Let's Encrypt)",
    )
    p.add_argument("--acme-email", help="contact address for the ACME account (default: admin)")
    p.add_argument(
        "--acme-ca-file",
        type=Path,
        metavar="PEM",
        help="CA bundle to verify the ACME server's HTTPS with (a private ACME CA such as "
        "step-ca, or Pebble; never needed for Let's Encrypt)",
    )
    p.add_argument("--user", default="postillon", help="the service user (default postillon)")
    p.add_argument(
        "--listen-host", default="0.0.0.0", help="address the mail ports bind (default 0.0.0.0)"
    )
    p.add_argument(
        "--ports",
        default="25,465,587",
        metavar="SMTP,SUBMISSIONS,SUBMISSION",
        help="the three mail ports (default 25,465,587)",
    )
    p.add_argument("--admin-listen", default="127.0.0.1:8025", help="the admin page's address")
    p.add_argument(
        "--https-port",
        type=int,
        default=443,
        help="port of the HTTPS listener for ACME TLS-ALPN-01 and the MTA-STS policy (default 443)",
    )
    p.add_argument(
        "--self-signed",
        action="store_true",
        help="no ACME: make a self-signed certificate (for hosts a CA cannot reach)",
    )


def _domain(text: str) -> str:
    try:
        name = domain_to_ascii(text.strip().rstrip(".")).lower()
    except (AddressError, UnicodeError, ValueError):
        name = ""
    if "." not in name:
        raise ValueError(f"{text!r} is not a domain name")
    return name


def _options(args: argparse.Namespace) -> SetupOptions:
    domains = tuple(dict.fromkeys(_domain(d) for d in args.domain))
    hostname = _domain(args.hostname)
    admin = args.admin_email or f"postmaster@{domains[0]}"
    local, at, admin_domain = admin.strip().rpartition("@")
    if not at or not local or _domain(admin_domain) not in domains:
        raise ValueError(f"--admin-email {admin!r} must be an address in one of the --domain")
    ca_file = args.acme_ca_file.resolve() if args.acme_ca_file else None
    if ca_file is not None and not ca_file.is_file():
        raise ValueError(f"--acme-ca-file {args.acme_ca_file}: no such file")
    try:
        smtp, submissions, submission = (int(p) for p in args.ports.split(","))
    except ValueError:
        raise ValueError("--ports takes three numbers: SMTP,SUBMISSIONS,SUBMISSION") from None
    return SetupOptions(
        hostname=hostname,
        domains=domains,
        admin_email=f"{local}@{_domain(admin_domain)}",
        user=args.user,
        listen_host=args.listen_host,
        ports=(smtp, submissions, submission),
        admin_listen=args.admin_listen,
        acme_directory=args.acme_directory,
        acme_email=args.acme_email,
        acme_ca_file=ca_file,
        https_port=args.https_port,
        self_signed=args.self_signed,
    )


def run(args: argparse.Namespace) -> int:
    try:
        options = _options(args)
    except ValueError as exc:
        print(f"postillon setup: {exc}", file=sys.stderr)
        return 2
    root = args.root.resolve() if args.root else None
    layout = Layout.for_root(root)
    try:
        report = run_setup(options, layout, dry_run=args.dry_run, force=args.force)
    except ConfigError as exc:
        print(f"postillon setup: {exc}", file=sys.stderr)
        return 1
    except (AccountError, KeyStoreError, subprocess.CalledProcessError) as exc:
        print(f"postillon setup: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"postillon setup: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    _print_report(report, layout, options)
    return 0


def _print_report(report: Report, layout: Layout, options: SetupOptions) -> None:
    title = "Would change" if report.dry_run else "Changed"
    if report.changed:
        print(f"{title}:")
        for line in report.changed:
            print(f"  + {line}")
    else:
        print("Nothing to change: everything is already set up.")
    if report.unchanged:
        print("Already in place:")
        for line in report.unchanged:
            print(f"  = {line}")
    manual = list(report.manual)
    if options.self_signed:
        manual.append(
            "TLS: a self-signed certificate is used (--self-signed); the ACME keys are in "
            "the config as comments"
        )
    else:
        names = ", ".join([options.hostname, *(f"mta-sts.{d}" for d in options.domains)])
        forward = "" if options.https_port == 443 else f", forwarded to {options.https_port}"
        manual.append(
            f"TLS: the ACME CA must reach this host on port 443{forward} (TLS-ALPN-01) as {names}"
        )
    if manual:
        print("To do by hand:")
        for line in manual:
            print(f"  ! {line}")
    if report.password is not None:
        user, password = report.password
        print(f"\nMail account {user}, password (shown only now): {password}")
    config = report.config
    assert config is not None
    print("\nPublish these DNS records:")
    try:
        store = key_store_from_config(config.dkim, config.data_dir)
    except KeyStoreError:
        store = None
    for domain in options.domains:
        keys = store.keys_for(domain) if store is not None else ()
        plan = plan_for(
            domain,
            config.hostname,
            keys,
            smarthost=config.relay.smarthost,
            sts_policy=served_policy(config),
            sts_listen=config.mta_sts.listen,
            acme=config.tls.acme,
        )
        sys.stdout.write(plan.zone_text())
    where = f"--config {layout.config} " if layout.root is not None else ""
    print("\nNext:")
    if layout.root is None:
        print("  systemctl enable --now postillon")
    else:
        print(f"  postillon {where}serve")
    for domain in options.domains:
        print(f"  postillon {where}dns check {domain}")
