"""``[[shaping]]``: how fast and how wide mail goes to a destination, and ``[backoff]``.

Kept beside ``model.py`` (which imports it) to keep that file readable. The rules
are applied by ``outbound/shaping.py``; docs/shaping.md explains them.
"""

from __future__ import annotations

import ipaddress
import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["BackoffConfig", "ShapingRule", "parse_rate"]

_UNITS = {"s": 1.0, "sec": 1.0, "min": 60.0, "h": 3600.0, "hour": 3600.0}
_RATE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|min|h|hour)\s*")


def parse_rate(text: str) -> float:
    """``"300/min"`` → 5.0 (per second); ValueError naming the accepted forms."""
    match = _RATE.fullmatch(text)
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f'{text!r} is not a rate: write a positive "N/s", "N/min" or "N/h"')
    return float(match.group(1)) / _UNITS[match.group(2)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ShapingRule(_Frozen):
    """One ``[[shaping]]`` rule. The first rule that matches a delivery applies:
    ``mx:.suffix`` (an MX host name ending in ``.suffix``, or equal to it without the
    dot: every domain hosted by one provider shares the rule and its rate),
    ``domain:example.org`` (that recipient domain, or ``.example.org`` for its
    subdomains), or ``*`` (each destination on its own)."""

    match: str  # "mx:.provider.example", "domain:example.org" or "*"
    connections: int | None = Field(None, ge=1)  # at once, per destination IP
    messages_per_connection: int | None = Field(None, ge=1)  # then QUIT and reconnect
    rate: str | None = None  # messages per destination (token bucket), "300/min"
    connect_rate: str | None = None  # new connections per destination IP, "20/min"
    # Local addresses this destination's mail leaves from, instead of [outbound]
    # source_addresses (chosen as [outbound] source_selection says).
    source: tuple[str, ...] = ()

    @field_validator("source")
    @classmethod
    def _source(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for address in value:
            try:
                ipaddress.ip_address(address)
            except ValueError:
                raise ValueError(f"{address!r} is not an IP address") from None
        return value

    @field_validator("match")
    @classmethod
    def _match(cls, value: str) -> str:
        value = value.strip().lower()
        if value == "*":
            return value
        kind, _, name = value.partition(":")
        if kind not in ("mx", "domain") or not name.strip(". "):
            raise ValueError(
                f'{value!r}: write "mx:.provider.example", "domain:example.org" or "*"'
            )
        return value

    @field_validator("rate", "connect_rate")
    @classmethod
    def _rate(cls, value: str | None) -> str | None:
        if value is not None:
            parse_rate(value)
        return value

    @property
    def messages_per_second(self) -> float | None:
        return parse_rate(self.rate) if self.rate else None

    @property
    def connects_per_second(self) -> float | None:
        return parse_rate(self.connect_rate) if self.connect_rate else None


class BackoffConfig(_Frozen):
    """``[backoff]``: suspending a destination that pushes back (Postfix's
    destination concurrency feedback, KumoMTA's suspensions). A 421, or
    ``burst`` 4xx replies to the connection or to MAIL within ``window`` seconds,
    suspend new connections to the destination for ``initial`` seconds, doubling
    with each suspension in a row up to ``maximum``."""

    enabled: bool = True  # suspend destinations that push back
    initial: float = Field(60.0, gt=0)  # seconds of the first suspension
    maximum: float = Field(3600.0, gt=0)  # longest suspension, in seconds
    burst: int = Field(5, ge=1)  # this many 4xx replies (connect, EHLO, MAIL) suspend
    window: float = Field(60.0, gt=0)  # seconds in which `burst` replies count
    # A delivery none of whose addresses accepted a connection (refused, unreachable,
    # timed out) suspends the destination too, as Postfix's dead destinations.
    unreachable: bool = True
    # A suspension that ended more than this long ago no longer lengthens the next.
    forget_after: float = Field(3600.0, gt=0)
