"""Pure parts of operations: syslog framing, log targets, what a reload may
change, metric label choices, and the Prometheus exposition."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from postillon.config.changes import effective, restart_needed
from postillon.config.loader import ConfigError, parse_config
from postillon.config.model import Config, LogConfig
from postillon.core.reply import Reply
from postillon.observability.metrics import (
    ListenerMetrics,
    Metrics,
    outcome_reason,
    reject_reason_for_commit,
    reject_reason_for_recipient,
)
from postillon.observability.syslog import format_rfc3164, format_rfc5424, priority

# 2026-11-28 18:22:08.250 UTC
STAMP = 1795890128.25


def test_rfc5424_frame() -> None:
    frame = format_rfc5424(22, STAMP, "mx.example.org", 42, "Q1: received: from=<a@b>")
    assert frame == (
        b"<22>1 2026-11-28T18:22:08.250Z mx.example.org postillon 42 - - "
        b"\xef\xbb\xbfQ1: received: from=<a@b>"
    )


def test_rfc5424_header_fields_are_printable_ascii() -> None:
    frame = format_rfc5424(22, STAMP, "bad host\u00e9", 1, "caf\u00e9\nline two")
    assert frame.split(b" ")[2] == b"bad_host_"
    assert frame.endswith("caf\u00e9 line two".encode())


def test_rfc3164_frame(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    try:
        frame = format_rfc3164(22, STAMP - 27 * 86400, "mx.example.org", 42, "hello")
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    # The day is space-padded; the host is the short name (RFC 3164 4.1.2).
    assert frame == b"<22>Nov  1 18:22:08 mx postillon[42]: hello"


def test_priority() -> None:
    assert priority("mail", logging.INFO) == 22
    assert priority("mail", logging.ERROR) == 19
    assert priority("local7", logging.DEBUG) == 191


def test_log_targets() -> None:
    assert LogConfig().destination == ("stderr", None)
    assert LogConfig(file=Path("/x.log")).destination == ("file", Path("/x.log"))
    assert LogConfig(target="file:/y.log", file=Path("/x.log")).destination == (
        "file",
        Path("/y.log"),
    )
    assert LogConfig(target="syslog").destination == ("syslog", Path("/dev/log"))
    assert LogConfig(target="syslog:/run/l").destination == ("syslog", Path("/run/l"))
    with pytest.raises(ConfigError, match=r"log.target: log.target 'udp:x'"):
        parse_config({"log": {"target": "udp:x"}})


def test_log_target_relative_to_config_file() -> None:
    config = parse_config({"log": {"target": "file:logs/mail.log"}}, "/etc/postillon/p.toml")
    assert config.log.destination == ("file", Path("/etc/postillon/logs/mail.log"))


def test_restart_needed_names_keys() -> None:
    old = parse_config({"listen": [{"address": "127.0.0.1:25"}]})
    new = parse_config(
        {
            "listen": [{"address": "127.0.0.1:26"}],
            "hostname": "mx2",
            "outbound": {"port": 2526},
            "admin": {"listen": "127.0.0.1:8025"},
            "queue": {"first_retry": 10.0},
            "data_dir": "/elsewhere",
            "helper_processes": 3,
        }
    )
    assert sorted(restart_needed(old, new)) == ["admin.listen", "data_dir", "listen"]
    applied = effective(old, new)
    assert applied.helper_processes == 3
    assert applied.hostname == "mx2" and applied.queue.first_retry == 10.0
    assert applied.outbound.port == 2526
    assert applied.listen == old.listen and applied.admin == old.admin
    assert applied.data_dir == old.data_dir
    assert restart_needed(old, old) == []
    assert effective(old, old) == old


def test_reason_labels_are_a_small_set() -> None:
    assert outcome_reason(Reply.of(451, "4.4.1", "x")) == "4.4"
    assert outcome_reason(Reply.of(550, "5.1.1", "x")) == "5.1"
    assert outcome_reason(Reply.of(554, None, "x")) == "5xx"
    assert outcome_reason(Reply.of(550, "5.123.1", "x")) == "5xx"
    assert reject_reason_for_recipient(Reply.of(554, "5.7.1", "relay")) == "relay_denied"
    assert reject_reason_for_recipient(Reply.of(550, "5.1.1", "x")) == "unknown_recipient"
    assert reject_reason_for_commit(Reply.of(554, "5.4.6", "loop")) == "loop"
    assert reject_reason_for_commit(Reply.of(451, "4.3.0", "x")) == "local_error"


def test_exposition_parses_and_queue_is_read_at_most_once_a_second() -> None:
    metrics = Metrics()
    reads = 0

    async def count() -> dict[str, int]:
        nonlocal reads
        reads += 1
        return {"pending": 3, "deferred": 1}

    metrics.queue.attach(count)
    listener = ListenerMetrics(metrics, "smtp:127.0.0.1:25")
    listener.rejected("relay_denied")
    listener.rejected("not-a-reason")  # counted, under a known label
    metrics.delivery_seconds.labels("delivered").observe(0.3)

    async def scrape_twice() -> bytes:
        await metrics.render()
        return await metrics.render()

    text = asyncio.run(scrape_twice()).decode()
    assert reads == 1
    families = {f.name: f for f in text_string_to_metric_families(text)}
    queue = {s.labels["state"]: s.value for s in families["postillon_queue_records"].samples}
    assert queue == {"pending": 3, "deferred": 1}
    rejected = {
        s.labels["reason"]: s.value
        for s in families["postillon_messages_rejected"].samples
        if s.name.endswith("_total") and s.value
    }
    assert rejected == {"relay_denied": 1, "recipient": 1}
    buckets = [
        s for s in families["postillon_delivery_seconds"].samples if s.name.endswith("_bucket")
    ]
    assert {s.labels["le"]: s.value for s in buckets}["0.5"] == 1


def test_default_config_needs_no_restart() -> None:
    assert restart_needed(Config(), Config()) == []


def test_unusable_log_target_is_a_config_error(tmp_path: Path) -> None:
    from postillon.observability.maillog import configure_logging

    missing = tmp_path / "no-such.sock"
    expected = f"log.target: cannot connect to the syslog socket {missing}"
    with pytest.raises(ConfigError, match=re.escape(expected)):
        configure_logging(LogConfig(target=f"syslog:{missing}"))
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    with pytest.raises(ConfigError, match=r"log\.file: cannot open"):
        configure_logging(LogConfig(file=not_a_dir / "mail.log"))
