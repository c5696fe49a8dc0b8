"""The inbound policy's shared state in every store: greylisting, rate counters, DMARC
report counters (store.py step 9).

Design note
-----------
One bundle per store (``store.policy_state``), so a store adds one attribute however many
pieces of policy state there are: ``greylist`` (``greylist_state.py``), ``rates``
(``rate_counters.py``) and ``dmarc_reports`` (``dmarc_reports.py``). Their tables are one
schema step (SQLite ``user_version`` 7, PostgreSQL migration 7); every statement is
``CREATE ... IF NOT EXISTS`` and self-contained, so renumbering the step is one line in
each schema file.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Final

from postillon.queue import dmarc_reports, greylist_state, rate_counters

__all__ = [
    "POSTGRES_TABLES",
    "SQLITE_TABLES",
    "MemoryPolicyState",
    "PostgresPolicyState",
    "SqlitePolicyState",
]

SQLITE_TABLES: Final = (
    greylist_state.SQLITE_TABLES + rate_counters.SQLITE_TABLES + dmarc_reports.SQLITE_TABLES
)
POSTGRES_TABLES: Final = (
    greylist_state.POSTGRES_TABLES + rate_counters.POSTGRES_TABLES + dmarc_reports.POSTGRES_TABLES
)

Run = Callable[[Callable[[Any], Any]], Awaitable[Any]]


class SqlitePolicyState:
    def __init__(self, read: Run, write: Run) -> None:
        self.greylist = greylist_state.SqliteGreylist(read, write)
        self.rates = rate_counters.SqliteRateCounters(read, write)
        self.dmarc_reports = dmarc_reports.SqliteDmarcReports(read, write)


class PostgresPolicyState:
    """``write`` should not wait for a durable commit: this is state, not mail."""

    def __init__(self, read: Run, write: Run) -> None:
        self.greylist = greylist_state.PostgresGreylist(read, write)
        self.rates = rate_counters.PostgresRateCounters(read, write)
        self.dmarc_reports = dmarc_reports.PostgresDmarcReports(read, write)


class MemoryPolicyState:
    def __init__(self, check_open: Callable[[], None]) -> None:
        self.greylist = greylist_state.MemoryGreylist(check_open)
        self.rates = rate_counters.MemoryRateCounters(check_open)
        self.dmarc_reports = dmarc_reports.MemoryDmarcReports(check_open)
