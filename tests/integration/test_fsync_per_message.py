"""fsyncs per relayed message, counted with strace on the real server.

    smtplib ──▶ postillon (under strace -f -e fsync,fdatasync) ──smtp──▶ smtp-sink

A relayed message costs one fsync: its acceptance (the 250 is sent only after the
queue's WAL is fsync'd). Its delivery outcome commits without one (``durable=False``
in queue/sqlite_writer.py): a lost outcome only repeats a delivery. The messages go
one at a time, each delivered before the next is sent, so no two messages share a
group commit: with outcomes fsync'd again the count is about two per message, and
with the acceptance not fsync'd it is below one.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from support.server import ServerProcess

if TYPE_CHECKING:
    from sink_fixtures import Sink

pytestmark = pytest.mark.integration

MESSAGES = 12
FSYNC_CALL = re.compile(r"\b(fsync|fdatasync)\(")


def _traced_threads(pid: int) -> bool:
    """Whether strace has attached to every thread of ``pid``."""
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        try:
            tracer = re.search(r"^TracerPid:\s*(\d+)", status.read_text(), re.M)
        except OSError:  # the thread ended meanwhile
            continue
        if tracer is None or tracer.group(1) == "0":
            return False
    return True


def test_a_relayed_message_costs_one_fsync(
    make_server: Callable[..., ServerProcess], sink: Callable[..., Sink], tmp_path: Path
) -> None:
    strace = shutil.which("strace")
    if strace is None:
        pytest.fail("strace is missing: run scripts/install-system-deps.sh")
    target = sink()
    server = make_server(
        relay={"trusted_networks": ["127.0.0.0/8"]},
        transport=[{"domain": "relay.test", "route": f"smtp:[127.0.0.1]:{target.port}"}],
    ).start()
    assert server.proc is not None
    # One message first: the writer thread, the read pool and the outbound path exist.
    server.wait_outcome(server.send_message("warm@relay.test"), ("delivered",))

    out = tmp_path / "strace.txt"
    command = [strace, "-f", "-qq", "-e", "trace=fsync,fdatasync", "-o", str(out)]
    tracer = subprocess.Popen(
        [*command, "-p", str(server.proc.pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not _traced_threads(server.proc.pid):
            assert time.monotonic() < deadline, "strace did not attach"
            time.sleep(0.05)
        for i in range(MESSAGES):
            queue_id = server.send_message(f"r{i}@relay.test")
            server.wait_outcome(queue_id, ("delivered",))
        time.sleep(0.3)  # nothing of the last delivery still in flight
    finally:
        tracer.send_signal(signal.SIGINT)  # detaches and flushes its output
        tracer.wait(timeout=10)
    calls = [line for line in out.read_text().splitlines() if FSYNC_CALL.search(line)]
    assert len(target.dumps(MESSAGES + 1)) == MESSAGES + 1
    # At least one per acceptance (each 250 waited for its own fsync), and no more
    # than a few besides (a checkpoint): the outcomes are not fsync'd.
    assert MESSAGES <= len(calls) <= MESSAGES + 3, "\n".join(calls)
