"""``postillon reload``: make the running server re-read its configuration.

The server writes its pid to ``<data_dir>/postillon.pid`` once it serves;
this command checks the configuration first (a broken file is reported here
and nothing is signalled), then sends the server SIGHUP. The server reopens
its log, re-reads config, certificates, aliases and accounts, and logs what
it applied, what it refused, and what needs a restart.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import signal
import ssl
import sys
import urllib.error
import urllib.request
from pathlib import Path

from postillon.config.loader import ConfigError, load_config
from postillon.config.model import Config, split_host_port
from postillon.paths import pid_path


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    r = sub.add_parser(
        "reload",
        help="make the running server re-read its config, certificates, aliases and accounts",
        description="Check the configuration, then send SIGHUP to the server whose pid is in "
        "<data_dir>/postillon.pid. The server reopens its log file (for logrotate), applies "
        "the new settings without dropping connections or mail, and logs any setting that "
        "needs a restart (listen, data_dir, user, the queue store, [admin]). "
        "Exit status: 0 signalled (with --api: applied), 1 no running server (with --api: "
        "refused by the server), 2 the config has errors.",
    )
    r.add_argument(
        "--api",
        action="store_true",
        help="ask the admin server ([admin] listen) instead of signalling, and print the "
        "result; the token comes from $POSTILLON_ADMIN_TOKEN (for a server in another "
        "container or run by another user)",
    )


class NotOurServer(Exception):
    """The pid file names a process that is not the postillon server it should be."""


def _read_pid_file(path: Path) -> tuple[int, int] | None:
    """(pid, the file's owner), or None when there is no usable pid file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None  # missing, or a symlink in its place: no server wrote that
    try:
        owner = os.fstat(fd).st_uid
        pid = int(os.read(fd, 64).decode("ascii", "replace").strip())
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    return (pid, owner) if pid > 1 else None


def signal_server(path: Path, sig: int = signal.SIGHUP) -> int | None:
    """Send ``sig`` to the server named in the pid file ``path``; return its pid, or
    None when no server runs. Raises NotOurServer (see ``check_server``) and
    PermissionError (not allowed to signal it).

    Through a pidfd where there is one: it pins the process first, so a pid that is
    reused between the check and the signal is not hit."""
    found = _read_pid_file(path)
    if found is None:
        return None
    pid, owner = found
    pidfd_open = getattr(os, "pidfd_open", None)
    try:
        pidfd = pidfd_open(pid) if pidfd_open is not None else None
    except ProcessLookupError:
        return None
    try:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass  # alive, another user's: check_server decides, then the kernel
        check_server(pid, owner)
        if pidfd is not None:
            signal.pidfd_send_signal(pidfd, sig)
        else:
            os.kill(pid, sig)
    finally:
        if pidfd is not None:
            os.close(pidfd)
    return pid


def check_server(pid: int, owner: int) -> None:
    """Refuse to signal ``pid`` unless it is a ``postillon ... serve`` process run by
    ``owner``, the pid file's owner (NotOurServer otherwise).

    The server writes its pid file after dropping root, so the file is its user's to
    rewrite: without this check root's ``postillon reload`` would send SIGHUP (whose
    default action is to terminate) to any process that user names. A process of the
    file's own owner is one that user could signal anyway; its command line must
    still be the server's. Linux's /proc is required to tell; elsewhere, only a
    non-root caller (whom the kernel already limits to their own processes) signals.
    """
    proc = Path(f"/proc/{pid}")
    try:
        status = (proc / "status").read_text()
        argv = (proc / "cmdline").read_bytes().split(b"\0")
    except OSError:
        if os.geteuid() == 0:
            raise NotOurServer(f"pid {pid}: cannot read /proc/{pid}") from None
        return
    uids = next((line.split()[1:] for line in status.splitlines() if line.startswith("Uid:")), [])
    if not uids or {int(u) for u in uids} != {owner}:
        raise NotOurServer(f"pid {pid} does not run as the pid file's owner (uid {owner})")
    names = [os.path.basename(a.decode("utf-8", "replace")) for a in argv if a]
    if "serve" not in names or not any(n.startswith("postillon") for n in names):
        raise NotOurServer(f"pid {pid} is not postillon serve: {' '.join(names)[:200]}")


def run(config: Config, config_file: Path | None, api: bool = False) -> int:
    if config_file is not None:
        try:
            load_config(config_file)
        except ConfigError as exc:
            print(f"{exc}\npostillon: not reloading; the server keeps its config", file=sys.stderr)
            return 2
    if api:
        return _via_api(config)
    path = pid_path(config.data_dir)
    try:
        pid = signal_server(path)
    except NotOurServer as exc:
        print(f"postillon: not signalling: {exc}; {path} is not postillon's", file=sys.stderr)
        return 1
    except PermissionError:
        print(
            f"postillon: not allowed to signal the server in {path}; run as its user or root",
            file=sys.stderr,
        )
        return 1
    if pid is None:
        print(f"postillon: no running server ({path} is missing or stale)", file=sys.stderr)
        return 1
    print(f"postillon: reload requested (pid {pid}); see the log for the result")
    return 0


def _via_api(config: Config) -> int:
    listen = config.admin.listen
    if listen is None:
        print("postillon: --api needs [admin] listen in the config", file=sys.stderr)
        return 2
    token = os.environ.get("POSTILLON_ADMIN_TOKEN", "")
    if not token:
        print(
            "postillon: set POSTILLON_ADMIN_TOKEN (from `postillon admin token`)", file=sys.stderr
        )
        return 2
    tls = config.admin.tls_cert is not None or config.admin.tls_from_server
    host, _ = split_host_port(listen)
    context: ssl.SSLContext | None = None
    if tls:
        context = ssl.create_default_context()
        if _is_loopback(host):
            # Our own server on loopback, often with a self-signed certificate.
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
    url = f"{'https' if tls else 'http'}://{listen}/api/reload"
    request = urllib.request.Request(
        url, method="POST", headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60, context=context) as response:
            result = json.load(response)
    except urllib.error.HTTPError as exc:
        if exc.code != 409:
            print(f"postillon: {url}: HTTP {exc.code} {exc.reason}", file=sys.stderr)
            return 1
        result = json.load(exc)
    except OSError as exc:
        print(f"postillon: {url}: {exc}", file=sys.stderr)
        return 1
    if not result.get("applied"):
        print(f"postillon: reload refused, the server keeps its config:\n{result.get('error')}")
        return 1
    print("postillon: configuration reloaded")
    if result.get("restart_needed"):
        print("needs a restart to take effect: " + ", ".join(result["restart_needed"]))
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
