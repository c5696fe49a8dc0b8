"""``postillon dkim ...``: make DKIM keys and show what to publish.

``keygen`` writes ``<keys_dir>/<domain>/<selector>.key`` (0600; owned by the server's ``user``
when run as root) and prints the TXT record; ``list`` shows every key the server will sign with
and its DNS name. Exit codes: 0 done, 1 the key could not be made or loaded, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from rich.console import Console
from rich.table import Table

from postillon.config.model import Config
from postillon.inbound.privileges import PrivilegeError, lookup_user, running_as_root
from postillon.signing.keys import (
    Algorithm,
    KeyStoreError,
    default_keys_dir,
    default_selector,
    key_store_from_config,
    write_new_key,
)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    d = sub.add_parser(
        "dkim",
        help="make DKIM signing keys and list them",
        description="DKIM signing keys (RFC 6376, RFC 8463). The server signs mail from local "
        "and authenticated senders with every key of the From: domain; keys live in "
        "<data_dir>/dkim/<domain>/<selector>.key ([dkim] keys_dir) or in [[dkim.key]].",
    )
    dsub = d.add_subparsers(dest="dkim_command", required=True, metavar="COMMAND")
    gen = dsub.add_parser(
        "keygen",
        help="make a key for a domain and print the DNS record to publish",
        description="Generate a private key under the keys directory (mode 0600) and print "
        "the TXT record to publish. `postillon reload` (or a restart) starts signing with it. "
        "Make both "
        "an rsa and an ed25519 key to send both signatures (RFC 8463 section 4).",
    )
    gen.add_argument("domain", help="the domain that signs (d=), e.g. example.org")
    gen.add_argument(
        "--algorithm",
        choices=("rsa", "ed25519"),
        default="rsa",
        help="rsa (2048 bits; understood everywhere, the default) or ed25519 (RFC 8463)",
    )
    gen.add_argument(
        "--selector",
        help="the selector (s=); default: rsaYYYYMM or edYYYYMM for this month",
    )
    ls = dsub.add_parser("list", help="list the signing keys and where their records go")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.add_argument(
        "--records", action="store_true", help="print each key's TXT record in zone-file form"
    )


def run(args: argparse.Namespace, config: Config) -> int:
    try:
        if args.dkim_command == "keygen":
            return _keygen(args, config)
        if args.dkim_command == "list":
            return _list(args, config)
    except KeyStoreError as exc:
        print(f"postillon: {exc}", file=sys.stderr)
        return 1
    except PrivilegeError as exc:
        print(f"postillon: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"postillon: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    raise AssertionError(args.dkim_command)


def _keygen(args: argparse.Namespace, config: Config) -> int:
    algorithm: Algorithm = args.algorithm
    now = time.gmtime()
    selector = args.selector or default_selector(algorithm, now.tm_year, now.tm_mon)
    owner = None
    if running_as_root() and config.user:
        entry = lookup_user(config.user)
        owner = (entry.pw_uid, entry.pw_gid)
    keys_dir = default_keys_dir(config.data_dir, config.dkim.keys_dir)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    key = write_new_key(keys_dir, args.domain, selector, algorithm, owner)
    print(f"; {algorithm} key for {key.domain}, selector {key.selector}: {key.path}")
    print("; publish this record, then check it with: postillon dns check " + key.domain)
    print(key.zone_record())
    if not config.dkim.sign:
        print("; note: [dkim] sign = false in the config: nothing is signed until it is true")
    return 0


def _list(args: argparse.Namespace, config: Config) -> int:
    store = key_store_from_config(config.dkim, config.data_dir)
    keys = list(store)
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "domain": k.domain,
                        "selector": k.selector,
                        "algorithm": k.algorithm,
                        "dns_name": k.dns_name,
                        "file": str(k.path),
                        "txt": k.txt_value(),
                    }
                    for k in keys
                ],
                indent=2,
            )
        )
        return 0
    if args.records:
        for k in keys:
            print(k.zone_record())
        return 0
    console = Console(width=None if sys.stdout.isatty() else 200)
    where = default_keys_dir(config.data_dir, config.dkim.keys_dir)
    if not keys:
        console.print(
            f"No DKIM keys (looked in {where} and [[dkim.key]]). "
            "Make one with: postillon dkim keygen DOMAIN"
        )
        return 0
    table = Table(title=f"{len(keys)} DKIM key(s)" + ("" if config.dkim.sign else " (signing off)"))
    table.add_column("Domain", no_wrap=True)
    table.add_column("Selector", no_wrap=True)
    table.add_column("Algorithm", no_wrap=True)
    table.add_column("TXT record at", no_wrap=True)
    table.add_column("Key file", overflow="fold")
    for k in keys:
        table.add_row(k.domain, k.selector, k.algorithm, k.dns_name + ".", str(k.path))
    console.print(table)
    return 0
