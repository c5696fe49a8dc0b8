"""Where the server keeps its files under ``data_dir``, for the server and the CLI alike.

Only names live here (no I/O, nothing heavy to import): the CLI commands that find the
queue or the running server import this module instead of the composition root.
"""

from __future__ import annotations

from pathlib import Path

from postillon.config.model import Config


def queue_path(config: Config) -> Path:
    """The embedded (SQLite) queue's database file."""
    return config.data_dir / "queue" / "queue.db"


def pid_path(data_dir: Path) -> Path:
    """The running server's pid file (``postillon reload`` and ``newaliases`` signal it)."""
    return data_dir / "postillon.pid"


def tls_dir(data_dir: Path) -> Path:
    """Where a self-signed certificate is made when none is configured."""
    return data_dir / "tls"


def acme_dir(data_dir: Path) -> Path:
    """The ACME account key, certificate, key and status ([tls] acme = true)."""
    return data_dir / "acme"
