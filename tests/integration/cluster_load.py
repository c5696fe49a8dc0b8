"""Helpers for the PostgreSQL cluster tests: node configs, a threaded SMTP load
generator that spreads numbered messages over several nodes, and a sink reader
that counts deliveries per message number.

Each message carries ``X-Seq: <n>``; a delivery is one smtp-sink dump file
holding it, so duplicates are dump files with the same number.
"""

from __future__ import annotations

import re
import smtplib
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from support.server import ServerProcess

_SEQ = re.compile(rb"^X-Seq: (\d+)\r?$", re.MULTILINE)


def node_config(dsn: str, sink_port: int, *, lease: float = 8.0) -> dict[str, Any]:
    """Overrides for ``make_server``: a node of a cluster sharing ``dsn``, relaying
    everything for sink.test to the sink."""
    return {
        "queue": {
            "store": "postgresql",
            "dsn": dsn,
            "first_retry": 1.0,
            "max_retry": 2.0,
            "lease": lease,
        },
        "relay": {"trusted_networks": ["127.0.0.0/8"]},
        "outbound": {"tls": "none"},
        "transport": [{"domain": "sink.test", "route": f"smtp:[127.0.0.1]:{sink_port}"}],
    }


def smtp_address(node: ServerProcess) -> tuple[str, int]:
    host, _, port = node.config["listen"][0]["address"].rpartition(":")
    return host, int(port)


def greeting(node: ServerProcess) -> str:
    """The first line a new SMTP connection gets ("" if the connection fails)."""
    try:
        with socket.create_connection(smtp_address(node), timeout=5) as s:
            return s.makefile("rb").readline().decode("ascii", "replace").strip()
    except OSError:
        return ""


def delivered_counts(dump_dir: Path) -> Counter[int]:
    """How many times each message number reached the sink."""
    counts: Counter[int] = Counter()
    for path in dump_dir.rglob("*"):
        if path.is_file():
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            found = _SEQ.search(data)
            if found:
                counts[int(found.group(1))] += 1
    return counts


@dataclass
class Load:
    """Send messages 0..total-1 over ``connections`` persistent SMTP sessions,
    spread round-robin over ``nodes``. A message whose attempt ends without a
    reply (the node died) or with a 4xx is tried again, like a real client,
    on the next live node; ``unacked`` counts attempts that got no reply."""

    nodes: Sequence[ServerProcess]
    total: int
    connections: int = 6
    alive: Callable[[ServerProcess], bool] = lambda node: True
    accepted: set[int] = field(default_factory=set)
    refused: Counter[str] = field(default_factory=Counter)  # "421 4.3.0" -> count
    unacked: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _next: int = 0
    _retry: list[int] = field(default_factory=list)
    _stop: bool = False

    def _take(self) -> int | None:
        with self._lock:
            if self._retry:
                return self._retry.pop()
            if self._next < self.total:
                self._next += 1
                return self._next - 1
            return None

    def _give_back(self, seq: int) -> None:
        with self._lock:
            self._retry.append(seq)

    def done(self) -> bool:
        with self._lock:
            return len(self.accepted) >= self.total

    def _worker(self, index: int) -> None:
        turn = index
        client: smtplib.SMTP | None = None
        while not self._stop and not self.done():
            node = self.nodes[turn % len(self.nodes)]
            if not self.alive(node):
                turn += 1
                continue
            if client is None:
                try:
                    client = smtplib.SMTP(*smtp_address(node), timeout=30)
                except (OSError, smtplib.SMTPException) as e:
                    code = getattr(e, "smtp_code", None)
                    if code:
                        with self._lock:
                            self.refused[f"{code} (greeting)"] += 1
                    client = None
                    turn += 1
                    time.sleep(0.05)
                    continue
            seq = self._take()
            if seq is None:
                time.sleep(0.01)  # others are still retrying theirs
                continue
            body = (
                f"From: load@example.org\r\nTo: user{seq % 7}@sink.test\r\n"
                f"Subject: load {seq}\r\nX-Seq: {seq}\r\n\r\nmessage {seq}\r\n"
            ).encode()
            try:
                client.sendmail("load@example.org", [f"user{seq % 7}@sink.test"], body)
            except smtplib.SMTPResponseException as e:
                with self._lock:
                    self.refused[f"{e.smtp_code} {e.smtp_error[:5].decode(errors='replace')}"] += 1
                self._give_back(seq)
                self._close(client)
                client = None
                turn += 1
                time.sleep(0.05)
                continue
            except smtplib.SMTPRecipientsRefused as e:
                with self._lock:
                    for code, _ in e.recipients.values():
                        self.refused[f"{code} (rcpt)"] += 1
                self._give_back(seq)
                self._close(client)
                client = None
                turn += 1
                time.sleep(0.05)
                continue
            except (OSError, smtplib.SMTPException):
                with self._lock:
                    self.unacked += 1  # sent, but no reply: the node died under us
                self._give_back(seq)
                self._close(client)
                client = None
                turn += 1
                continue
            with self._lock:
                self.accepted.add(seq)
        if client is not None:
            self._close(client)

    @staticmethod
    def _close(client: smtplib.SMTP) -> None:
        try:
            client.quit()
        except (OSError, smtplib.SMTPException):
            client.close()

    def start(self) -> list[threading.Thread]:
        threads = [
            threading.Thread(target=self._worker, args=(i,), daemon=True)
            for i in range(self.connections)
        ]
        for t in threads:
            t.start()
        self.threads = threads
        return threads

    def wait_accepted(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.accepted) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"only {len(self.accepted)} of {count} accepted")
            time.sleep(0.02)

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self._stop = True
        assert self.done(), f"{len(self.accepted)} of {self.total} accepted"
