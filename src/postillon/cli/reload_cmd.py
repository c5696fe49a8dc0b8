"""``postillon reload``: make the running server re-read its configuration.

The server writes its pid to ``<data_dir>/postillon.pid`` once it serves;
this command checks the configuration first (a broken file is reported here
and nothing is signalled), then sends the server SIGHUP. The server reopens
its log, re-reads config, certificates, aliases and accounts, and logs what
it applied, what it refused, and what needs a restart.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from postillon.app import pid_path
from postillon.config.loader import ConfigError, load_config
from postillon.config.model import Config


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sub.add_parser(
        "reload",
        help="make the running server re-read its config, certificates, aliases and accounts",
        description="Check the configuration, then send SIGHUP to the server whose pid is in "
        "<data_dir>/postillon.pid. The server reopens its log file (for logrotate), applies "
        "the new settings without dropping connections or mail, and logs any setting that "
        "needs a restart (listen, data_dir, user, dns, outbound, the queue store). "
        "Exit status: 0 signalled, 1 no running server, 2 the config has errors.",
    )


def read_pid(path: Path) -> int | None:
    """The pid in the pid file if that process is alive, else None."""
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, owned by another user: signalling may still fail below
    return pid


def run(config: Config, config_file: Path | None) -> int:
    if config_file is not None:
        try:
            load_config(config_file)
        except ConfigError as exc:
            print(f"{exc}\npostillon: not reloading; the server keeps its config", file=sys.stderr)
            return 2
    path = pid_path(config.data_dir)
    pid = read_pid(path)
    if pid is None:
        print(f"postillon: no running server ({path} is missing or stale)", file=sys.stderr)
        return 1
    try:
        os.kill(pid, signal.SIGHUP)
    except PermissionError:
        print(
            f"postillon: not allowed to signal pid {pid}; run as its user or root", file=sys.stderr
        )
        return 1
    print(f"postillon: reload requested (pid {pid}); see the log for the result")
    return 0
