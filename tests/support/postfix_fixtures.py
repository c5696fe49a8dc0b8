"""pytest fixtures for a real, private Postfix MTA (``tests/support/postfix.py``).

Each fixture starts a ``PostfixInstance``: ``postfix -c <tmp>/etc start`` with its own queue,
mail log and Maildirs in a temporary directory, SMTP on ``127.0.0.4:25``, delivering
``pf.test`` to Maildir, relaying only where a test says (``transports``), never using DNS.
At teardown it is stopped with ``postfix stop`` and nothing stays running. Opt in per module
with ``pytest_plugins = ["support.postfix_fixtures"]`` (``tests/`` is on ``sys.path``: see
``pythonpath`` in ``pyproject.toml``), or suite-wide from ``tests/conftest.py``.

Fixtures:

* ``make_postfix``  factory ``(**PostfixInstance options) -> started PostfixInstance``, for
                    example ``transports={"example.org": smtp_route("127.0.0.1", port)}``
                    or ``recipient_access={"defer@pf.test": "450 4.2.0 Try later"}``; all
                    are stopped at teardown.
* ``postfix``       a started instance with the defaults: ``.smtp_address``,
                    ``.send(sender, rcpts, msg)``, ``.messages(user)``, ``.log()``,
                    ``.wait_log(text)``.

If Postfix is not installed the fixtures FAIL (never skip), naming ``make system-deps``;
Postfix runs only as root, and run as another user they fail saying so. When a test using
them fails, Postfix's log is printed at teardown (pytest shows it under "Captured stdout
teardown").
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from typing import Any

import pytest

from support.postfix import PostfixInstance, PostfixNeedsRoot, PostfixNotInstalled

MakePostfix = Callable[..., PostfixInstance]

_CALL_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call":
        item.stash[_CALL_FAILED] = report.failed
    return report


def start_postfix(**options: Any) -> PostfixInstance:
    """Start a :class:`PostfixInstance`, turning "not installed" or "not root" into a test
    failure with a clear message."""
    try:
        return PostfixInstance(**options).start()
    except (PostfixNotInstalled, PostfixNeedsRoot) as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture
def make_postfix(request: pytest.FixtureRequest) -> Iterator[MakePostfix]:
    started: list[PostfixInstance] = []

    def make(**options: Any) -> PostfixInstance:
        instance = start_postfix(**options)
        started.append(instance)
        return instance

    yield make
    failed = request.node.stash.get(_CALL_FAILED, False)
    for instance in started:
        where = instance.directory
        instance.stop()
        if failed:
            print(f"---- Postfix log ({where}) ----\n{instance.log()}")


@pytest.fixture
def postfix(make_postfix: MakePostfix) -> PostfixInstance:
    """A running Postfix with the default options (see ``tests/support/postfix.py``)."""
    return make_postfix()
