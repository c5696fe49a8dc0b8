from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from support.server import ServerProcess, default_config

pytest_plugins = [
    "dns_fixtures",
    "support.dovecot_fixtures",
    "sink_fixtures",
    "support.postfix_fixtures",
    "support.postgres_fixtures",
    "admin_fixtures",
]

MakeServer = Callable[..., ServerProcess]


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[MakeServer]:
    """Build (not start) a postillon with the test config plus overrides."""
    started: list[ServerProcess] = []

    def make(**overrides: Any) -> ServerProcess:
        root = tmp_path / f"srv{len(started)}"
        root.mkdir()
        proc = ServerProcess(root, default_config(root, **overrides))
        started.append(proc)
        return proc

    yield make
    for proc in started:
        proc.stop()


@pytest.fixture
def server(make_server: MakeServer) -> ServerProcess:
    """A running postillon with the default test config (see tests/support/server.py)."""
    return make_server().start()
