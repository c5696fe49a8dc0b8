"""The certificate's life on a running server: load, obtain, renew, apply, back off.

One task (``run``) loops: load what is kept (files in ``data_dir/acme``, or the store's
copy when a cluster node renewed it), obtain a certificate when there is none, it names
other hosts, or its renewal time has come (or ``postillon tls renew`` asked), then sleep
until the next of: renewal time, the next check for a cluster node's newer copy, a
forced renewal. Each attempt runs ``acme_client.obtain`` in a worker thread. A failed
attempt keeps the certificate in use and retries after a delay that doubles from a minute
to six hours (a CA's rate limits punish a client that hammers it).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from postillon.certs.acme_client import AcmeError, Issued, OrderSettings, obtain
from postillon.certs.challenges import ChallengeBoard
from postillon.certs.storage import AcmeFiles, AcmeStatus, CertificateInfo, usable
from postillon.queue.store import AcmeStateStore, SharedCertificate

log = logging.getLogger("postillon.acme")

FIRST_BACKOFF = 60.0
MAX_BACKOFF = 6 * 3600.0
# How often a node looks for a certificate another node renewed (and re-checks its own).
CHECK_INTERVAL = 3600.0
# A renewing node's hold on the store's lease: far longer than one order takes.
LEASE_SECONDS = 600.0


@dataclass(frozen=True, slots=True)
class ManagerSettings:
    order: OrderSettings
    renew_before: float | None = None
    check_interval: float = CHECK_INTERVAL


def backoff(failures: int) -> float:
    """Seconds before the next try after ``failures`` failed in a row, with jitter so
    nodes and restarts do not retry in step."""
    base = min(FIRST_BACKOFF * 2 ** max(failures - 1, 0), MAX_BACKOFF)
    return float(base * random.uniform(0.8, 1.0))


class CertificateManager:
    """Keeps the server's ACME certificate current; ``apply(chain_path, key_path)`` loads
    a new one into every listener (called on the event loop)."""

    def __init__(
        self,
        settings: ManagerSettings,
        files: AcmeFiles,
        board: ChallengeBoard,
        apply: Callable[[], None],
        store: AcmeStateStore | None = None,
        on_status: Callable[[AcmeStatus], None] | None = None,
    ) -> None:
        self.settings = settings
        self.files = files
        self.board = board
        self.status = AcmeStatus(names=settings.order.names)
        self._apply = apply
        self._store = store
        self._on_status = on_status
        self._holder = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._wake = asyncio.Event()
        self._force = False
        self._task: asyncio.Task[None] | None = None
        self._info: CertificateInfo | None = None

    # -- what the rest of the server asks ---------------------------------------------

    def load_kept(self) -> bool:
        """At start (before serving): the certificate kept in ``data_dir/acme``, if it is
        whole and names the right hosts. Then the listeners can present it at once."""
        kept = self.files.load()
        if kept is None or not usable(*kept):
            return False
        self._info = CertificateInfo.of(kept[0])
        self._update(state="ok", served_by="acme", **self._cert_fields())
        return True

    def renew_now(self) -> None:
        """Renew at once, whatever the certificate's age (``postillon tls renew``)."""
        log.info("ACME: renewal requested")
        self._force = True
        self._wake.set()

    def reconfigure(self, settings: ManagerSettings) -> None:
        """A reload's names (domains changed) or renewal threshold: checked at once."""
        if settings != self.settings:
            self.settings = settings
            self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="acme")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    # -- the loop -----------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            await self._load_shared()
            now = time.time()
            due = self._due(now)
            if self._force or due <= now:
                forced, self._force = self._force, False
                wait = await self._attempt(forced)
            else:
                wait = min(due - now, self.settings.check_interval)
            self._update(next_attempt=time.time() + wait)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=max(wait, 0.0))
            except TimeoutError:
                pass

    def _due(self, now: float) -> float:
        info = self._info
        if self.status.failures and self.status.next_attempt is not None:
            return self.status.next_attempt  # backing off (a forced renewal skips it)
        if info is None or set(info.names) != set(self.settings.order.names):
            return now
        return info.renew_at(self.settings.renew_before)

    async def _attempt(self, forced: bool) -> float:
        """One try; returns how long to wait before the next check."""
        names = self.settings.order.names
        store = self._store
        if store is not None and not await store.take_lease(
            self._holder, time.time(), time.time() + LEASE_SECONDS
        ):
            log.info("ACME: another node is renewing the certificate; loading its result")
            return FIRST_BACKOFF
        self._update(state="renewing" if self._info else "none")
        log.info("ACME: ordering a certificate for %s", ", ".join(names))
        try:
            issued = await asyncio.to_thread(obtain, self.settings.order, self.files, self.board)
            await asyncio.to_thread(self.files.save, issued.chain_pem, issued.key_pem)
        except (AcmeError, OSError) as exc:
            return self._failed(str(exc))
        finally:
            if store is not None:
                await store.release_lease(self._holder)
        info = CertificateInfo.of(issued.chain_pem)
        if store is not None:
            await self._share(issued, info)
        self._install(info)
        self._update(
            state="ok",
            last_success=time.time(),
            last_error="",
            failures=0,
            renewals=self.status.renewals + 1,
            attempts=self.status.attempts + 1,
            last_attempt=time.time(),
        )
        log.info(
            "ACME: new certificate for %s from %s, valid until %s%s",
            ", ".join(info.names),
            info.issuer,
            time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(info.not_after)),
            " (renewal requested)" if forced else "",
        )
        return max(info.renew_at(self.settings.renew_before) - time.time(), 0.0)

    def _failed(self, error: str) -> float:
        failures = self.status.failures + 1
        wait = backoff(failures)
        kept = "the current certificate stays in use" if self._info else "no certificate yet"
        log.error(
            "ACME: could not obtain a certificate (attempt %d in a row; %s; next try in "
            "%.0f s): %s",
            failures,
            kept,
            wait,
            error,
        )
        self._update(
            state="failing",
            last_error=error,
            failures=failures,
            attempts=self.status.attempts + 1,
            last_attempt=time.time(),
        )
        return wait

    async def _share(self, issued: Issued, info: CertificateInfo) -> None:
        assert self._store is not None
        shared = SharedCertificate(
            self.settings.order.names, issued.chain_pem, issued.key_pem, info.not_after, time.time()
        )
        try:
            await self._store.save_certificate(shared)
        except Exception as exc:  # the certificate is ours already; the others retry
            log.warning("ACME: could not share the new certificate through the store: %s", exc)

    async def _load_shared(self) -> None:
        """A cluster node's newer certificate for the same names, from the store."""
        if self._store is None:
            return
        try:
            shared = await self._store.certificate(self.settings.order.names)
        except Exception as exc:
            log.warning("ACME: cannot read the shared certificate from the store: %s", exc)
            return
        if shared is None or not usable(shared.chain_pem, shared.key_pem):
            return
        if self._info is not None and shared.not_after <= self._info.not_after:
            return
        await asyncio.to_thread(self.files.save, shared.chain_pem, shared.key_pem)
        info = CertificateInfo.of(shared.chain_pem)
        self._install(info)
        self._update(state="ok", last_error="", failures=0)
        log.info("ACME: loaded the certificate another node renewed (until %s)", info.not_after)

    def _install(self, info: CertificateInfo) -> None:
        self._info = info
        self._apply()
        self._update(served_by="acme", **self._cert_fields())

    def _cert_fields(self) -> dict[str, object]:
        info = self._info
        assert info is not None
        return {"names": info.names, "not_after": info.not_after, "issuer": info.issuer}

    def _update(self, **changes: object) -> None:
        for key, value in changes.items():
            setattr(self.status, key, value)
        try:
            self.files.write_status(self.status)
        except OSError as exc:
            log.warning("ACME: cannot write %s: %s", self.files.directory, exc)
        if self._on_status is not None:
            self._on_status(self.status)
