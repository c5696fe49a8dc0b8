"""pytest fixtures for a real Dovecot LMTP server (``tests/support/dovecot.py``).

Each fixture starts a private ``dovecot -F`` in a temporary directory, listening for LMTP on
``127.0.0.1:<free port>`` and on a unix socket, and stops it at teardown (nothing stays
running). Opt in per module with ``pytest_plugins = ["support.dovecot_fixtures"]``
(``tests/`` is on ``sys.path``: see ``pythonpath`` in ``pyproject.toml``), or suite-wide from
``tests/conftest.py``.

Fixtures:

* ``dovecot_users``  the addresses Dovecot knows (default ``alice@example.org`` and
                     ``bob@example.org``); override it in a module or class. Any other
                     recipient is refused at RCPT with ``550 5.1.1``.
* ``dovecot``        a started :class:`DovecotLmtp` for ``dovecot_users``:
                     ``.lmtp_address`` ``(host, port)``, ``.unix_socket``, ``.maildir(user)``,
                     ``.messages(user)``, ``.log()``.
* ``make_dovecot``   factory ``(users=None, **DovecotLmtp options) -> started DovecotLmtp``
                     (for example ``save_to_detail_mailbox=True``); all are stopped at
                     teardown.

If Dovecot is not installed the fixtures FAIL (not skip), naming the Debian packages and
``make system-deps``. When a test using them fails, Dovecot's log is printed at teardown
(pytest shows it under "Captured stdout teardown").
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from typing import Any

import pytest

from support.dovecot import DovecotLmtp, DovecotNotInstalled

DEFAULT_USERS = ("alice@example.org", "bob@example.org")

MakeDovecot = Callable[..., DovecotLmtp]

_CALL_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call":
        item.stash[_CALL_FAILED] = report.failed
    return report


def start_dovecot(users: Any = DEFAULT_USERS, **options: Any) -> DovecotLmtp:
    """Start a :class:`DovecotLmtp`, turning "not installed" into a test failure."""
    try:
        return DovecotLmtp(users, **options).start()
    except DovecotNotInstalled as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture
def dovecot_users() -> list[str]:
    return list(DEFAULT_USERS)


@pytest.fixture
def make_dovecot(request: pytest.FixtureRequest, dovecot_users: list[str]) -> Iterator[MakeDovecot]:
    started: list[DovecotLmtp] = []

    def make(users: Any = None, **options: Any) -> DovecotLmtp:
        server = start_dovecot(dovecot_users if users is None else users, **options)
        started.append(server)
        return server

    yield make
    failed = request.node.stash.get(_CALL_FAILED, False)
    for server in started:
        server.stop()
        if failed:
            print(f"---- Dovecot log ({server.directory}) ----\n{server.log()}")


@pytest.fixture
def dovecot(make_dovecot: MakeDovecot) -> DovecotLmtp:
    """A running Dovecot LMTP server for ``dovecot_users``."""
    return make_dovecot()
