"""``postillon import-postfix [DIR] > postillon.toml``: translate a Postfix configuration.

Reads ``DIR/main.cf``, ``DIR/master.cf`` and the lookup tables they name (postfiximport/),
prints a postillon config on stdout; what could not be translated is in it as comments,
each with the reason. Exit codes: 0 printed, 1 the directory has no readable main.cf.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from pathlib import Path

from postillon.postfiximport.postconf import read_config_dir
from postillon.postfiximport.render import render
from postillon.postfiximport.translate import translate


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "import-postfix",
        help="translate a Postfix configuration into postillon.toml (printed)",
        description="Read main.cf, master.cf and their hash:/texthash: tables from DIR "
        "(default /etc/postfix) and print the equivalent postillon.toml: hostname, domains "
        "and mailboxes, aliases, transports, relayhost (with its SASL password), trusted "
        "networks, the TLS certificate, the message size limit, the recipient delimiter "
        "and the smtpd/submission listeners. Everything not translated is printed as a "
        "comment with the reason. Check the result with `postillon check-config FILE`.",
    )
    p.add_argument("directory", nargs="?", default="/etc/postfix", type=Path)


def run(args: argparse.Namespace) -> int:
    directory: Path = args.directory
    try:
        main, services = read_config_dir(directory, socket.gethostname())
    except OSError as exc:
        print(
            f"postillon import-postfix: {directory / 'main.cf'}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1
    translation = translate(main, services, directory)
    sys.stdout.write(render(translation, directory, time.strftime("%Y-%m-%d", time.gmtime())))
    return 0
