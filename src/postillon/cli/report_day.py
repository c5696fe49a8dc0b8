"""What ``postillon tls report`` and ``postillon dmarc report`` check before they run:
the UTC day asked for (default: yesterday, the last complete day) and a queue to read
the counters from."""

from __future__ import annotations

import datetime
import sys

from postillon.config.model import Config
from postillon.paths import queue_path

__all__ = ["report_day"]


def report_day(day: str | None, config: Config) -> str | int:
    """The day to report (``YYYY-MM-DD``), or the exit code after saying what is wrong."""
    if day is None:
        yesterday = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
        day = yesterday.strftime("%Y-%m-%d")
    try:
        datetime.datetime.strptime(day, "%Y-%m-%d")
    except ValueError:
        print(f"postillon: --day {day!r}: expected YYYY-MM-DD", file=sys.stderr)
        return 2
    if config.queue.store == "sqlite" and not queue_path(config).exists():
        print(
            f"postillon: no queue at {queue_path(config)} (has the server run with this config?)",
            file=sys.stderr,
        )
        return 1
    return day
