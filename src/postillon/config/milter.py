"""``[[milter]]``: mail filters spoken to over the Sendmail/Postfix milter protocol
(rspamd, OpenDKIM, clamav-milter, ...), asked in the order they are written."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, field_validator

from postillon.config.address import split_host_port

__all__ = ["MilterConfig", "Milters", "parse_milter_address"]

MilterListener = Literal["smtp", "submission", "submissions", "lmtp"]


def parse_milter_address(value: str) -> tuple[str, str, int]:
    """``("inet", host, port)`` or ``("unix", path, 0)``.

    Accepts ``inet:HOST:PORT``, ``inet:[v6]:PORT``, Sendmail's ``inet:PORT@HOST``,
    ``inet6:...`` likewise, and ``unix:/path`` (also ``local:/path``)."""
    kind, sep, rest = value.partition(":")
    if not sep or not rest:
        raise ValueError(f'{value!r}: use "inet:127.0.0.1:11332" or "unix:/path"')
    if kind in ("unix", "local"):
        if not rest.startswith("/"):
            raise ValueError(f"{value!r}: a unix socket needs an absolute path")
        return ("unix", rest, 0)
    if kind not in ("inet", "inet6"):
        raise ValueError(f'{value!r}: the address starts with "inet:" or "unix:"')
    if "@" in rest:  # Sendmail/Postfix spelling: inet:11332@127.0.0.1
        port_text, _, host = rest.partition("@")
        host = host.strip("[]")
        try:
            port = int(port_text)
        except ValueError:
            raise ValueError(f"{value!r}: bad port {port_text!r}") from None
    else:
        host, port = split_host_port(rest)
    if not host or not 0 < port < 65536:
        raise ValueError(f"{value!r}: needs a host and a port between 1 and 65535")
    return ("inet", host, port)


class MilterConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # Shown in the log, the explain trace and metrics; unique among milters.
    name: str
    address: str  # "inet:HOST:PORT", "inet6:[HOST]:PORT" or "unix:/path"
    # The listener kinds whose sessions this milter sees. Port 25 by default:
    # filtering a user's own submissions is a choice, not a default.
    listeners: tuple[MilterListener, ...] = ("smtp",)
    # Seconds for connecting and for each reply (SMFIR_PROGRESS restarts it).
    # Postfix waits 30 s to connect and 10 s per command; a spam scan of a large
    # message takes longer, so one generous number.
    timeout: float = 30.0
    # What happens when the milter is down, too slow, closes mid-dialogue or sends
    # garbage: tempfail (451, the sender retries), accept (go on without it), or
    # reject (550). Postfix's milter_default_action is tempfail too.
    default_action: Literal["tempfail", "accept", "reject"] = "tempfail"
    # Keep the connection for the next SMTP session (SMFIC_QUIT_NC, saving a TCP
    # connection and the negotiation per session). "auto": only where libmilter takes
    # QUIT_NC (after an end of message it answered "continue"; after accept/reject it
    # would ignore QUIT_NC and the next CONNECT). "always": after any session that
    # ended cleanly, for milters that reset on QUIT_NC in any state (rspamd does;
    # a libmilter filter would then cost a timeout per reuse). "never": SMFIC_QUIT.
    reuse_connections: Literal["auto", "always", "never"] = "auto"

    @field_validator("address")
    @classmethod
    def _check_address(cls, value: str) -> str:
        parse_milter_address(value)
        return value

    @field_validator("timeout")
    @classmethod
    def _check_timeout(cls, value: float) -> float:
        if not 0 < value <= 3600:
            raise ValueError("must be more than 0 and at most 3600 seconds")
        return value

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not value or not all(c.isalnum() or c in "-_." for c in value):
            raise ValueError("a name of letters, digits, '-', '_' or '.'")
        return value


def _unique_names(milters: tuple[MilterConfig, ...]) -> tuple[MilterConfig, ...]:
    names = [m.name for m in milters]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ValueError(f"milter[{i}]: name {name!r} is used twice")
    return milters


# ``Config.milter``: the list, with names unique (they key the log and explain).
Milters = Annotated[tuple[MilterConfig, ...], AfterValidator(_unique_names)]
