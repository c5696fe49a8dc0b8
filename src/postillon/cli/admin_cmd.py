"""``postillon admin ...``: the admin server's token.

``postillon admin token`` makes a new token, stores only its hash in the data
directory and prints the token once; the running server accepts it at once
(and stops accepting the previous one). Lost tokens cannot be recovered,
only replaced.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from postillon.admin.token import generate_token, token_path
from postillon.config.model import Config
from postillon.osutil.safeio import owner_of


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    a = sub.add_parser(
        "admin",
        help="manage access to the admin web page and HTTP API",
        description="The admin server ([admin] listen) needs a token for everything but "
        "/healthz. `postillon admin token` makes a new one and shows it once; only its "
        "hash is stored. The running server accepts the new token at once.",
    )
    asub = a.add_subparsers(dest="admin_command", required=True, metavar="COMMAND")
    t = asub.add_parser(
        "token",
        help="make a new admin token (replaces the old one) and print it once",
        description="Make a new admin token, store its SHA-256 in <data_dir>/admin-token.json "
        "(mode 0600), and print the token. The previous token stops working.",
    )
    t.add_argument("--json", action="store_true", help='print {"token": ..., "file": ...}')


def run(args: argparse.Namespace, config: Config) -> int:
    if args.admin_command == "token":
        path = token_path(config.data_dir)
        try:
            # Run as root, the file goes to whoever owns data_dir: the server's user
            # after its first start, who must be able to read it (the server checks
            # every request against it).
            config.data_dir.mkdir(parents=True, exist_ok=True)
            owner = owner_of(config.data_dir) if os.geteuid() == 0 else None
            token = generate_token(path, owner)
        except OSError as exc:
            print(f"postillon: cannot write {path}: {exc.strerror}", file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps({"token": token, "file": str(path)}))
            return 0
        print(token)
        print(
            f"(stored as a hash in {path}; this is the only time the token is shown)",
            file=sys.stderr,
        )
        return 0
    raise AssertionError(args.admin_command)
