"""Milter macros: the values Sendmail and Postfix hand a milter at each stage.

Pure functions from what the pipeline knows (``context.py``) to ``{name: value}``.
A milter may name the macros it wants per stage in its OPTNEG answer; the protocol
core then sends only those (looked up in everything known so far). Without a list,
each stage sends Postfix's defaults (``milter_*_macros`` in its postconf(5)).
"""

from __future__ import annotations

from postillon.checks.context import (
    ClientFacts,
    RecipientFacts,
    SessionContext,
    TransactionContext,
)
from postillon.core.envelope import MailParams
from postillon.protocol.milter_wire import Stage

# Postfix's default macro list per stage (postconf(5) milter_*_macros), as far as
# postillon knows the values.
DEFAULT_MACROS: dict[Stage, tuple[str, ...]] = {
    Stage.CONNECT: (
        "j",
        "{daemon_name}",
        "v",
        "_",
        "{client_addr}",
        "{client_port}",
        "{client_name}",
        "{client_ptr}",
        "{client_resolve}",
    ),
    Stage.HELO: ("{tls_version}", "{cipher}"),
    Stage.ENVFROM: ("i", "{auth_type}", "{auth_authen}", "{mail_addr}", "{mail_host}"),
    Stage.ENVRCPT: ("{rcpt_addr}", "{rcpt_host}", "{rcpt_mailer}"),
    Stage.DATA: ("i",),
    Stage.EOH: (),
    Stage.EOM: ("i",),
}


def known_macros(
    s: SessionContext,
    hostname: str,
    tx: TransactionContext | None = None,
    rcpt: RecipientFacts | None = None,
) -> dict[str, str]:
    """Every macro value known at this point of the session."""
    values = _client_macros(s.client, hostname)
    _add_transaction(values, tx, rcpt)
    return values


class SessionMacros:
    """``known_macros`` for one session, its client part built once per ``ClientFacts``
    (frozen, replaced as it grows: HELO, STARTTLS, AUTH) instead of at every phase."""

    __slots__ = ("_base", "_client", "hostname")

    def __init__(self, hostname: str) -> None:
        self.hostname = hostname
        self._client: ClientFacts | None = None
        self._base: dict[str, str] = {}

    def known(
        self,
        s: SessionContext,
        tx: TransactionContext | None = None,
        rcpt: RecipientFacts | None = None,
    ) -> dict[str, str]:
        """As ``known_macros``; the caller must not change the dict it gets."""
        if s.client is not self._client:
            self._base = _client_macros(s.client, self.hostname)
            self._client = s.client
        if tx is None and rcpt is None:
            return self._base
        values = dict(self._base)
        _add_transaction(values, tx, rcpt)
        return values


def _client_macros(c: ClientFacts, hostname: str) -> dict[str, str]:
    name = c.rdns or "unknown"
    values: dict[str, str] = {
        "j": hostname,
        "{daemon_name}": c.listener or c.kind,
        "v": "postillon",
        "_": f"{name} [{c.ip}]" if c.ip else "localhost",
        "{client_addr}": c.ip,
        "{client_port}": str(c.port),
        "{client_name}": name,
        "{client_ptr}": name,
        "{client_resolve}": {"ok": "OK", "tempfail": "TEMP"}.get(c.rdns_status, "FAIL"),
    }
    if c.helo:
        values["s"] = c.helo
    if c.tls_version:
        values["{tls_version}"] = c.tls_version
        values["{cipher}"] = c.tls_cipher
    if c.authenticated:
        values["{auth_authen}"] = c.username
        values["{auth_type}"] = "LOGIN"  # the mechanism is not kept; the identity is
    return values


def _add_transaction(
    values: dict[str, str], tx: TransactionContext | None, rcpt: RecipientFacts | None
) -> None:
    if tx is not None:
        if tx.queue_id:
            values["i"] = tx.queue_id
        values["{mail_addr}"] = tx.sender
        values["{mail_host}"] = tx.sender.rpartition("@")[2]
    if rcpt is not None:
        values["{rcpt_addr}"] = rcpt.address
        values["{rcpt_host}"] = rcpt.address.rpartition("@")[2]
        values["{rcpt_mailer}"] = "smtp"


def stage_macros(stage: Stage, known: dict[str, str]) -> dict[str, str]:
    """The default macros of ``stage`` that have a value (the protocol core narrows
    this to the milter's own list when it gave one, looking in ``known``)."""
    return {name: known[name] for name in DEFAULT_MACROS[stage] if name in known}


def mail_args(params: MailParams | None) -> list[str]:
    """The ESMTP parameters of MAIL FROM, as SMFIC_MAIL carries them after the path."""
    if params is None:
        return []
    args: list[str] = []
    if params.size is not None:
        args.append(f"SIZE={params.size}")
    if params.body.value != "7BIT":
        args.append(f"BODY={params.body.value}")
    if params.smtputf8:
        args.append("SMTPUTF8")
    if params.requiretls:
        args.append("REQUIRETLS")
    return args
