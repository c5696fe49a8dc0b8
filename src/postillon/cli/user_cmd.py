"""``postillon user ...``: the accounts that may submit mail (port 587/465 AUTH).

Passwords come from an interactive prompt (asked twice) or, for scripts,
one line on stdin with ``--password-stdin``; never from the command line,
where every user of the machine could read them in the process list. The
server notices changes within a second; no restart is needed.

Exit codes: 0 done, 1 the change could not be made (user exists, no such
user, file problem), 2 bad input (usage, empty or mismatched password, bad
address).
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys

from rich.console import Console
from rich.table import Table

from postillon.config.model import Config
from postillon.inbound.accounts import (
    AccountError,
    AccountExists,
    AccountStore,
    NoSuchAccount,
    accounts_path,
    check_address,
)


class _InputError(Exception):
    """Bad input from the operator: exit code 2."""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    u = sub.add_parser(
        "user",
        help="add, change, delete and list accounts for mail submission",
        description="Manage the accounts that may authenticate and submit mail. "
        "Passwords are read from a prompt or from stdin (--password-stdin), never "
        "from the command line; the running server picks up changes by itself.",
    )
    usub = u.add_subparsers(dest="user_command", required=True, metavar="COMMAND")
    add = usub.add_parser("add", help="add a user (asks for the password)")
    add.add_argument("username", help="login name, normally the user's email address")
    add.add_argument(
        "--address",
        action="append",
        default=[],
        metavar="ADDRESS",
        help="an address the user may send as (repeatable; *@domain for a whole domain; "
        "default: the username)",
    )
    add.add_argument(
        "--password-stdin", action="store_true", help="read the password from stdin (one line)"
    )
    pw = usub.add_parser("passwd", help="change a user's password")
    pw.add_argument("username")
    pw.add_argument(
        "--password-stdin", action="store_true", help="read the password from stdin (one line)"
    )
    delete = usub.add_parser("delete", help="delete a user")
    delete.add_argument("username")
    ls = usub.add_parser("list", help="list users and the addresses they may send as")
    ls.add_argument("--json", action="store_true", help="machine-readable output")


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        line = sys.stdin.readline()
        password = line.removesuffix("\n").removesuffix("\r")
        if not password:
            raise _InputError("no password on stdin (expected one line)")
        return password
    if not sys.stdin.isatty():
        raise _InputError("stdin is not a terminal; use --password-stdin to pipe the password")
    first = getpass.getpass("Password: ")
    if not first:
        raise _InputError("empty password")
    if getpass.getpass("Password (again): ") != first:
        raise _InputError("the passwords do not match")
    return first


def run(args: argparse.Namespace, config: Config) -> int:
    path = accounts_path(config.data_dir, config.submission.accounts_file)
    try:
        return _dispatch(args, AccountStore(path))
    except _InputError as exc:
        print(f"postillon: {exc}", file=sys.stderr)
        return 2
    except AccountError as exc:  # exists, no such user, damaged or unreadable file
        print(f"postillon: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"postillon: {path}: {exc.strerror or exc}", file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace, store: AccountStore) -> int:
    cmd = args.user_command
    if cmd == "add":
        try:
            addresses = [check_address(a) for a in args.address]
        except AccountError as exc:
            raise _InputError(str(exc)) from None
        if store.get(args.username) is not None:
            # Say so before asking for a password that would be thrown away.
            raise AccountExists(f"user {args.username.strip().lower()} already exists")
        password = _read_password(args.password_stdin)
        try:
            account = store.add(args.username, password, addresses)
        except AccountExists:
            raise
        except AccountError as exc:
            raise _InputError(str(exc)) from None
        print(f"{account.username}: added; may send as {', '.join(account.addresses)}")
        return 0
    if cmd == "passwd":
        if store.get(args.username) is None:
            raise NoSuchAccount(f"no user {args.username.strip().lower()}")
        password = _read_password(args.password_stdin)
        try:
            store.set_password(args.username, password)
        except NoSuchAccount:
            raise
        except AccountError as exc:
            raise _InputError(str(exc)) from None
        print(f"{args.username.strip().lower()}: password changed")
        return 0
    if cmd == "delete":
        store.delete(args.username)
        print(f"{args.username.strip().lower()}: deleted")
        return 0
    if cmd == "list":
        users = store.users()
        if args.json:
            print(
                json.dumps(
                    [
                        {
                            "username": a.username,
                            "addresses": list(a.addresses),
                            "created": created,
                            "updated": updated,
                        }
                        for a, created, updated in users
                    ],
                    indent=2,
                )
            )
            return 0
        console = Console(width=None if sys.stdout.isatty() else 200)
        if not users:
            console.print(f"No users in {store.path}.")
            return 0
        table = Table(title=f"{len(users)} user(s) in {store.path}")
        table.add_column("User", no_wrap=True)
        table.add_column("May send as", overflow="fold")
        table.add_column("Password changed (UTC)", no_wrap=True)
        for a, _created, updated in users:
            table.add_row(a.username, "\n".join(a.addresses), updated.replace("T", " ").rstrip("Z"))
        console.print(table)
        return 0
    raise AssertionError(cmd)
