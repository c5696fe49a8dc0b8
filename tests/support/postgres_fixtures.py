"""pytest fixtures for a real PostgreSQL server (``tests/support/postgres.py``).

Fixtures:

* ``postgres_server``  session-scoped: one private cluster per test run, started at first
                       use (initdb + start take about a second), stopped at the end.
* ``postgres_dsn``     a fresh, empty database on that cluster for one test; its DSN.

If PostgreSQL is not installed the fixtures FAIL (not skip), naming the Debian package and
``make system-deps``. A failing test prints the server log at teardown.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from support.postgres import PostgresNotInstalled, PostgresServer

_databases = itertools.count(1)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    try:
        server = PostgresServer().start()
    except PostgresNotInstalled as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def postgres_dsn(postgres_server: PostgresServer) -> str:
    """A new empty database (the server is restarted first if a test left it stopped)."""
    postgres_server.start()
    return postgres_server.create_database(f"t{next(_databases)}")
