"""Run the real ``postillon serve`` as a subprocess for integration tests.

Tests talk to it over real sockets on loopback; the helper writes a config
into a temporary directory, picks free ports, waits until the listeners
accept, and can kill it (gracefully or with SIGKILL) and start it again on
the same data directory.
"""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from support.ports import free_port, stop_process

__all__ = ["ServerProcess", "default_config", "is_helper", "to_toml"]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value))


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else _toml_value(key)


def to_toml(data: dict[str, Any]) -> str:
    """Enough TOML writing for test configs (tables and arrays of tables)."""
    lines: list[str] = []
    tables: list[tuple[str, Any]] = []
    for key, value in data.items():
        is_table_array = (
            isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)
        )
        if isinstance(value, dict) or is_table_array:
            tables.append((key, value))
        else:
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for key, value in tables:
        if isinstance(value, dict):
            lines.append(f"\n[{key}]")
            lines.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
        else:
            for item in value:
                lines.append(f"\n[[{key}]]")
                lines.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in item.items())
    return "\n".join(lines) + "\n"


@dataclass
class ServerProcess:
    root: Path
    config: dict[str, Any]
    ports: dict[str, int] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)  # added to the server's environment

    @property
    def config_path(self) -> Path:
        return self.root / "postillon.toml"

    @property
    def data_dir(self) -> Path:
        return self.root / "var"

    @property
    def log_path(self) -> Path:
        return self.root / "mail.log"

    def write_config(self) -> None:
        self.config_path.write_text(to_toml(self.config))

    def start(self, timeout: float = 20.0) -> ServerProcess:
        self.write_config()
        env = {**os.environ, **self.env}
        env.pop("POSTILLON_CONFIG", None)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "postillon.cli.main",
                "--config",
                str(self.config_path),
                "serve",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(self.root / "stderr.log", "ab"),  # noqa: SIM115
            env=env,
        )
        deadline = time.monotonic() + timeout
        for listen in self.config.get("listen", []):
            host, _, port = listen["address"].rpartition(":")
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"postillon exited early:\n{self.stderr()}")
                try:
                    with socket.create_connection((host.strip("[]"), int(port)), timeout=1):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"postillon did not listen on {listen['address']}:\n{self.stderr()}"
                        ) from None
                    time.sleep(0.05)
        return self

    def stderr(self) -> str:
        try:
            return (self.root / "stderr.log").read_text(errors="replace")[-5000:]
        except OSError:
            return ""

    def maillog(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_for_log(self, text: str, timeout: float = 20.0) -> str:
        """The mail log once it contains ``text`` (or as it is after ``timeout``):
        a delivery's log line is written just after the file lands in the Maildir."""
        deadline = time.monotonic() + timeout
        while text not in (log := self.maillog()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return log

    def send_message(
        self,
        rcpt: str,
        body: bytes = b"Subject: test\r\n\r\nhello\r\n",
        sender: str = "alice@example.org",
    ) -> str:
        """Send one message to the first listener over plain SMTP; its queue id."""
        host, _, port = self.config["listen"][0]["address"].rpartition(":")
        with smtplib.SMTP(host, int(port), timeout=10) as client:
            client.ehlo("client.test")
            client.mail(sender)
            assert client.rcpt(rcpt)[0] == 250
            code, reply = client.data(body)
        assert code == 250, reply
        return reply.decode().rsplit(" ", 1)[1]

    def wait_outcome(
        self,
        queue_id: str,
        kinds: tuple[str, ...] = ("delivered", "deferred", "bounced"),
        timeout: float = 20.0,
    ) -> str:
        """The first mail-log line saying ``queue_id`` was one of ``kinds``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.maillog().splitlines():
                if any(f"{queue_id}: {kind}:" in line for kind in kinds):
                    return line
            time.sleep(0.1)
        raise AssertionError(f"no outcome for {queue_id}:\n{self.maillog()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        return stop_process(self.proc, sig, timeout)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def helper_pids(self) -> list[int]:
        """The server's helper processes (``python -m postillon.helpers.process``)."""
        assert self.proc is not None
        return [
            int(child)
            for task in Path(f"/proc/{self.proc.pid}/task").iterdir()
            for child in (task / "children").read_text().split()
            if is_helper(int(child))
        ]

    def cli_command(self) -> list[str]:
        """``postillon --config <this server's config>`` as an argv prefix."""
        return [sys.executable, "-m", "postillon.cli.main", "--config", str(self.config_path)]

    def cli(
        self, *args: str, check: bool = True, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``postillon <args>`` on this server's config; ``env``: variables to add."""
        return subprocess.run(
            [*self.cli_command(), *args],
            capture_output=True,
            text=True,
            check=check,
            timeout=60,
            env={**os.environ, **env} if env else None,
        )

    def maildir_messages(self, address: str) -> list[Path]:
        local, _, domain = address.rpartition("@")
        new = self.data_dir / "mail" / domain.lower() / local.lower() / "new"
        if not new.is_dir():
            return []
        return sorted(new.iterdir())

    def iter_all_mail(self) -> Iterator[Path]:
        yield from (self.data_dir / "mail").glob("*/*/new/*")

    def wait_for_mail(self, address: str, count: int = 1, timeout: float = 20.0) -> list[Path]:
        deadline = time.monotonic() + timeout
        while True:
            found = self.maildir_messages(address)
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{address}: {len(found)} of {count} message(s) after {timeout}s\n"
                    f"log:\n{self.maillog()[-3000:]}\nstderr:\n{self.stderr()}"
                )
            time.sleep(0.05)


def is_helper(pid: int) -> bool:
    """Whether ``pid`` runs a postillon helper process (not a reused pid)."""
    try:
        return b"postillon.helpers.process" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def default_config(root: Path, **overrides: Any) -> dict[str, Any]:
    smtp = free_port()
    config: dict[str, Any] = {
        "hostname": "mx.test.example",
        "data_dir": "var",
        "user": "",
        "listen": [{"kind": "smtp", "address": f"127.0.0.1:{smtp}"}],
        "relay": {"trusted_networks": []},
        "domain": [
            {
                "name": "example.org",
                "mailboxes": ["alice", "bob", "postmaster"],
                "aliases": {"team": ["alice", "bob"]},
            },
            {"name": "catchall.test", "mailboxes": ["info"], "catch_all": "info"},
        ],
        "log": {"format": "text", "file": "mail.log"},
        "queue": {"first_retry": 1.0, "max_retry": 2.0},
        # Nothing a test does may reach the machine's resolver: a closed
        # loopback port answers every query with "connection refused" (a
        # temporary DNS failure). Tests that need DNS start a DNS server.
        "dns": {"nameservers": ["127.0.0.1:9"], "timeout": 0.5, "attempts": 1},
        # Inbound SPF/DKIM/DMARC checks need DNS, which most tests do not
        # serve (they would all get 451); tests of the checks turn them on.
        "authentication": {"enabled": False},
        # A test that stops a server with a delivery stuck in flight should not
        # wait the production grace (30 s) for it.
        "shutdown": {"grace": 5.0},
    }
    config.update(overrides)
    return config
