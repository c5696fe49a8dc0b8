"""``postillon tls renew``: renew the ACME certificate now ([tls] acme = true).

The running server answers the CA's challenges (its sockets on 443 and 80), so the
renewal happens there: this command sends it SIGUSR2 (the pid in
``<data_dir>/postillon.pid``), then waits for the attempt to finish by watching
``data_dir/acme/status.json`` and prints its result. The new certificate is loaded into
every listener without a restart; sessions already up keep theirs.

Exit codes: 0 renewed, 1 the renewal failed (the old certificate stays; the CA's error
is printed) or no server runs or it did not answer in time, 2 ACME is not configured.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

from postillon.certs.storage import AcmeFiles
from postillon.cli.reload_cmd import NotOurServer, signal_server
from postillon.config.model import Config
from postillon.paths import acme_dir, pid_path


def add_parser(tsub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    renew = tsub.add_parser(
        "renew",
        help="renew the ACME certificate now and apply it without a restart",
        description="Ask the running server to renew its ACME certificate ([tls] acme = "
        "true) at once, whatever its age, and wait for the result. The new certificate "
        "is loaded into every listener without a restart. Exit status: 0 renewed, 1 "
        "failed (the current certificate stays in use) or no running server, 2 ACME is "
        "not configured.",
    )
    renew.add_argument(
        "--wait",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="how long to wait for the result (default 300; 0: do not wait)",
    )


def run_renew(args: argparse.Namespace, config: Config) -> int:
    if not config.tls.acme:
        print("postillon: tls renew: [tls] acme is not true in this config", file=sys.stderr)
        return 2
    files = AcmeFiles(acme_dir(config.data_dir))
    before = _attempts(files)
    try:
        pid = signal_server(pid_path(config.data_dir), signal.SIGUSR2)
    except (NotOurServer, PermissionError) as exc:
        print(f"postillon: tls renew: {exc}", file=sys.stderr)
        return 1
    if pid is None:
        print("postillon: tls renew: no running server (start it: it obtains the "
              "certificate itself)", file=sys.stderr)  # fmt: skip
        return 1
    print(f"renewal requested from the server (pid {pid})")
    if args.wait <= 0:
        return 0
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        status = files.read_status()
        if status is not None and _count(status) > before:
            if status.get("state") == "ok":
                names = status.get("names")
                shown = ", ".join(str(n) for n in names) if isinstance(names, list) else ""
                print(
                    f"renewed: {shown}, valid until "
                    f"{status.get('not_after')}, issued by {status.get('issuer')}"
                )
                return 0
            print(f"renewal failed (the current certificate stays): {status.get('last_error')}")
            return 1
        time.sleep(0.2)
    print(f"postillon: tls renew: no result after {args.wait:.0f} s", file=sys.stderr)
    return 1


def _count(status: dict[str, object]) -> int:
    value = status.get("attempts")
    return value if isinstance(value, int) else 0


def _attempts(files: AcmeFiles) -> int:
    status = files.read_status()
    return _count(status) if status is not None else 0
