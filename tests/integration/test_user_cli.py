"""`postillon user ...` as a real subprocess against a config's data_dir.

operator ──stdin──▶ postillon user add/passwd/delete/list ──▶ <data_dir>/accounts.json (0600)
                                                                   ▲
                                        AccountStore (what the server reads) ┘
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from postillon.inbound.accounts import AccountStore

pytestmark = pytest.mark.integration


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "postillon.toml"
    path.write_text('hostname = "mx.test"\ndata_dir = "var"\n')
    return path


def cli(config: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "postillon.cli.main", "--config", str(config), "user", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )


def test_add_list_passwd_delete(config: Path) -> None:
    accounts = config.parent / "var" / "accounts.json"
    secret = "s3cret-Pässword"
    added = cli(
        config,
        "add",
        "Alice@Example.com",
        "--address",
        "alice@example.com",
        "--address",
        "*@team.example",
        "--password-stdin",
        stdin=secret + "\n",
    )
    assert added.returncode == 0, added.stderr
    assert "alice@example.com: added" in added.stdout
    assert secret not in added.stdout + added.stderr

    assert stat.S_IMODE(accounts.stat().st_mode) == 0o600
    assert secret not in accounts.read_text()
    store = AccountStore(accounts)
    account = store.verify_password("alice@example.com", secret)
    assert account is not None and account.addresses == ("alice@example.com", "*@team.example")

    listed = cli(config, "list")
    assert listed.returncode == 0
    assert "alice@example.com" in listed.stdout and "*@team.example" in listed.stdout
    as_json = json.loads(cli(config, "list", "--json").stdout)
    assert [u["username"] for u in as_json] == ["alice@example.com"]
    assert as_json[0]["addresses"] == ["alice@example.com", "*@team.example"]

    again = cli(config, "add", "alice@example.com", "--password-stdin", stdin="x\n")
    assert again.returncode == 1 and "already exists" in again.stderr

    changed = cli(config, "passwd", "alice@example.com", "--password-stdin", stdin="new-one\n")
    assert changed.returncode == 0, changed.stderr
    fresh = AccountStore(accounts)
    assert fresh.verify_password("alice@example.com", "new-one") is not None
    assert fresh.verify_password("alice@example.com", secret) is None
    assert stat.S_IMODE(accounts.stat().st_mode) == 0o600

    deleted = cli(config, "delete", "alice@example.com")
    assert deleted.returncode == 0 and "deleted" in deleted.stdout
    assert json.loads(cli(config, "list", "--json").stdout) == []
    assert "No users" in cli(config, "list").stdout


def test_errors_and_exit_codes(config: Path) -> None:
    # No password on the command line: there is no option for it.
    argv_pw = cli(config, "add", "bob@example.com", "--password", "pw")
    assert argv_pw.returncode == 2
    # stdin is not a terminal and --password-stdin was not given: refuse, do not echo.
    no_tty = cli(config, "add", "bob@example.com", stdin="pw\n")
    assert no_tty.returncode == 2 and "--password-stdin" in no_tty.stderr
    empty = cli(config, "add", "bob@example.com", "--password-stdin", stdin="\n")
    assert empty.returncode == 2 and "no password" in empty.stderr
    bad_addr = cli(
        config, "add", "bob@example.com", "--address", "bob", "--password-stdin", stdin="pw\n"
    )
    assert bad_addr.returncode == 2 and "must look like" in bad_addr.stderr
    missing = cli(config, "passwd", "nobody@example.com", "--password-stdin", stdin="pw\n")
    assert missing.returncode == 1 and "no user" in missing.stderr
    assert cli(config, "delete", "nobody@example.com").returncode == 1
    assert not (config.parent / "var" / "accounts.json").exists()


def test_damaged_file_is_reported_not_overwritten(config: Path) -> None:
    accounts = config.parent / "var" / "accounts.json"
    accounts.parent.mkdir()
    accounts.write_text("{oops")
    result = cli(config, "add", "bob@example.com", "--password-stdin", stdin="pw\n")
    assert result.returncode == 1 and "damaged" in result.stderr
    assert accounts.read_text() == "{oops"
