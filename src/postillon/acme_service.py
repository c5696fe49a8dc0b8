"""The ACME pieces of a running server, built from the config (``[tls] acme = true``).

Part of the composition root (it may import anything): ``app.App`` binds the HTTP-01
socket before dropping root, starts the manager once the queue store is open, and gives
it the ``apply`` callback that loads a new certificate into every TLS context the
listeners hold.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from postillon.certs.acme_client import OrderSettings
from postillon.certs.challenges import ChallengeBoard, Http01Server
from postillon.certs.manager import CertificateManager, ManagerSettings
from postillon.certs.storage import AcmeFiles, AcmeStatus
from postillon.config.model import Config
from postillon.paths import acme_dir
from postillon.queue.store import AcmeStateStore

log = logging.getLogger("postillon.acme")


def acme_names(config: Config) -> tuple[str, ...]:
    """The hostname, then ``mta-sts.DOMAIN`` for each local domain (RFC 8461 §3.3: the
    policy host needs a certificate senders accept)."""
    host = config.hostname.strip().lower().rstrip(".")
    names = [host] + [f"mta-sts.{d}" for d in sorted(config.local_domains)]
    return tuple(dict.fromkeys(names))


def manager_settings(config: Config) -> ManagerSettings:
    tls = config.tls
    types = []
    if config.mta_sts.listen is not None:
        types.append("tls-alpn-01")
    if tls.acme_http_listen is not None:
        types.append("http-01")
    order = OrderSettings(
        directory=tls.acme_directory,
        names=acme_names(config),
        email=tls.acme_email,
        ca_file=tls.acme_ca_file,
        challenge_types=tuple(types),
    )
    return ManagerSettings(order, renew_before=tls.acme_renew_before)


class AcmeService:
    """The challenge board, the HTTP-01 server and the certificate manager of one server."""

    def __init__(self, config: Config) -> None:
        self.board = ChallengeBoard()
        self.files = AcmeFiles(acme_dir(config.data_dir))
        self.http01 = (
            Http01Server(config.tls.acme_http_listen, self.board)
            if config.tls.acme_http_listen is not None
            else None
        )
        self._settings = manager_settings(config)
        self.manager: CertificateManager | None = None

    async def bind(self) -> None:
        """Bind the HTTP-01 socket (port 80: as root, before the privilege drop)."""
        if self.http01 is not None:
            await self.http01.bind()

    async def start(
        self,
        apply: Callable[[], None],
        store: AcmeStateStore | None,
        on_status: Callable[[AcmeStatus], None] | None = None,
    ) -> None:
        self.manager = CertificateManager(
            self._settings, self.files, self.board, apply, store, on_status
        )
        self.manager.load_kept()
        if self.http01 is not None:
            await self.http01.start()
        self.manager.start()

    def reconfigure(self, config: Config) -> None:
        if self.manager is not None:
            self.manager.reconfigure(manager_settings(config))

    def renew_now(self) -> None:
        if self.manager is not None:
            self.manager.renew_now()

    @property
    def status(self) -> AcmeStatus | None:
        return self.manager.status if self.manager is not None else None

    async def stop(self) -> None:
        if self.manager is not None:
            await self.manager.stop()
        if self.http01 is not None:
            await self.http01.stop()
