"""A config that names something that is not there is refused up front.

    postillon.toml: [[domain]] catchall.test, catch_all = "catchall" (no such mailbox)
        ──▶ postillon check-config   exit 2, the key named
        ──▶ postillon serve          refuses to start, the key named

Before, both accepted it, and the server then refused every unknown recipient of
the domain with 550 5.1.1: mail to a catch-all domain lost without a word.
"""

from __future__ import annotations

import pytest

from support.server import ServerProcess

pytestmark = pytest.mark.integration

DANGLING = [
    {
        "name": "example.org",
        "mailboxes": ["alice", "postmaster"],
        "aliases": {"team": ["alice", "bob"]},
    },
    {"name": "catchall.test", "mailboxes": ["info"], "catch_all": "catchall"},
]
EXPECTED = [
    'domain[0].aliases.team: "bob" is not a mailbox or alias of example.org',
    'domain[1].catch_all: "catchall" is not a mailbox or alias of catchall.test',
]


def test_check_config_names_each_dangling_reference(make_server) -> None:  # type: ignore[no-untyped-def]
    server: ServerProcess = make_server(domain=DANGLING)
    server.write_config()
    checked = server.cli("check-config", str(server.config_path), check=False)
    assert checked.returncode == 2, checked.stdout
    assert checked.stderr.splitlines() == [f"{server.config_path}: {line}" for line in EXPECTED]


def test_server_refuses_to_start_with_a_dangling_catch_all(make_server) -> None:  # type: ignore[no-untyped-def]
    server: ServerProcess = make_server(domain=DANGLING)
    with pytest.raises(RuntimeError, match="exited early") as refused:
        server.start(timeout=30)
    for line in EXPECTED:
        assert line in str(refused.value)
    assert server.proc is not None and server.proc.returncode == 1
