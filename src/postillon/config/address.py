"""Listening addresses in the configuration."""

from __future__ import annotations


def split_host_port(value: str) -> tuple[str, int]:
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest.lstrip(":")
    else:
        host, _, port = value.rpartition(":")
    try:
        return host, int(port)
    except ValueError as exc:
        raise ValueError(f"address {value!r} must be host:port") from exc
