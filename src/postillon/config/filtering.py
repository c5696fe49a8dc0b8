"""Settings of the port-25 checks and the explain trace, split from ``model`` (which
re-exports them): ``[dnsbl]``, ``[client_checks]``, ``[explain]``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator

from postillon.core.address import AddressError, parse_domain

__all__ = ["ClientChecksConfig", "DnsblConfig", "ExplainConfig"]


class DnsblConfig(BaseModel):
    """DNS block and allow lists with weights, as postscreen's ``dnsbl_sites``:
    ``zones = { "zen.example" = 2, "list.dnswl.example" = -2 }``; a client whose
    listed zones add up to ``threshold`` or more is refused at connect (port 25 only).
    A negative weight is an allow list (DNSWL): it lowers the score, and a client
    listed there skips greylisting."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    zones: dict[str, int] = {}
    threshold: int = 1
    # Seconds to wait for all the zones' answers at connect; a zone that has not
    # answered by then counts as "not listed" (never refuse on a slow list).
    timeout: float = 3.0

    @field_validator("zones")
    @classmethod
    def _zones(cls, value: dict[str, int]) -> dict[str, int]:
        checked: dict[str, int] = {}
        for zone, weight in value.items():
            try:
                name = parse_domain(zone.rstrip("."))
            except AddressError as exc:
                raise ValueError(f"{zone!r} is not a DNS zone name: {exc}") from None
            if weight == 0:
                raise ValueError(f"{zone!r}: a weight of 0 would never count; remove the zone")
            checked[name.lower()] = weight
        return checked

    @field_validator("threshold")
    @classmethod
    def _threshold(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be 1 or more (a lower threshold refuses unlisted clients)")
        return value

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, value: float) -> float:
        if not 0 < value <= 60:
            raise ValueError("must be more than 0 and at most 60 seconds")
        return value


UnknownClientAction = Literal["off", "tempfail", "reject"]


class ClientChecksConfig(BaseModel):
    """Who is talking, checked on port 25 (``smtp`` listeners) before any mail."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Seconds to wait before the greeting; a client that talks meanwhile is a
    # pregreeter (a bot that does not wait for the server) and is refused with 554.
    # 0 = no pause, no pregreet test.
    greet_pause: float = 0.0
    # Forward-confirmed reverse DNS of the client (PTR, and that name's A/AAAA
    # includes the IP): filled into Received: and the checks' facts.
    reverse_dns: bool = False
    # A client without forward-confirmed reverse DNS: "off" accepts, "tempfail"
    # answers 450 4.7.25, "reject" 550 5.7.25 (RFC 7372); a DNS failure is always
    # 450. Anything but "off" turns reverse_dns on.
    reject_unknown_client: UnknownClientAction = "off"
    # HELO/EHLO: refuse a name that is not a domain or an address literal, and a
    # client (not trusted, not authenticated) claiming our own name or address.
    helo_checks: bool = False

    @field_validator("greet_pause")
    @classmethod
    def _pause(cls, value: float) -> float:
        if not 0 <= value <= 60:
            raise ValueError("must be between 0 and 60 seconds")
        return value

    @property
    def wants_reverse_dns(self) -> bool:
        return self.reverse_dns or self.reject_unknown_client != "off"


class ExplainConfig(BaseModel):
    """The decision trace ``postillon explain`` reads (kept in the queue store)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    # Steps older than this are dropped (hourly); the trace is for "why", not an archive.
    keep_hours: float = 72.0
    # Seconds between writes of buffered steps to the store (a crash loses at most these).
    flush_interval: float = 2.0

    @field_validator("keep_hours")
    @classmethod
    def _keep(cls, value: float) -> float:
        if not 1 <= value <= 24 * 90:
            raise ValueError("must be between 1 and 2160 hours")
        return value

    @field_validator("flush_interval")
    @classmethod
    def _flush(cls, value: float) -> float:
        if not 0 < value <= 60:
            raise ValueError("must be more than 0 and at most 60 seconds")
        return value
