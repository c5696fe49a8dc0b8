"""Test helpers for DKIM: key records as fixture zones, dkimpy and OpenDKIM as verifiers.

OpenDKIM's tools look keys up through the C library's resolver, which only reads
/etc/resolv.conf and only talks to port 53. :func:`opendkim_testmsg` therefore runs the tool
in a private mount namespace (``unshare -m``) where a resolv.conf naming 127.0.0.153 is
bind-mounted over /etc/resolv.conf, with a fixture DnsServer on 127.0.0.153:53: it asks
only the test's DNS server, and nothing else on the machine sees the change. That needs root
(for port 53 and the mount); the test run (scripts/run-tests.sh) is root in a loopback-only
network namespace.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import dkim
import dns.message
import dns.query
import dns.rdatatype
import pytest

from postillon.testing.dkim_keys import rsa_key_and_record, txt_rdata
from postillon.testing.dns_server import DnsServer

OPENDKIM_DNS_HOST = "127.0.0.153"
# Re-exported: the tests take every DKIM helper from here.
__all__ = ["rsa_key_and_record", "txt_rdata"]


def key_zone(keys: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Zones publishing ``postillon dkim list --json`` output, one zone per domain."""
    zones: dict[str, dict[str, Any]] = {}
    for key in keys:
        zones.setdefault(key["domain"], {})[key["dns_name"]] = {"TXT": txt_rdata(key["txt"])}
    return zones


def listed_keys(cli_output: str) -> list[dict[str, Any]]:
    return list(json.loads(cli_output))


def dkimpy_verify_all(message: bytes, nameserver: str) -> list[bool]:
    """dkimpy's verdict on every DKIM-Signature, keys fetched from the fixture DNS server."""
    host, _, port = nameserver.rpartition(":")

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        query = dns.message.make_query(name.decode().rstrip(".") + ".", dns.rdatatype.TXT)
        reply = dns.query.udp(query, host, port=int(port), timeout=2)
        for rrset in reply.answer:
            for rd in rrset:
                return b"".join(rd.strings)  # type: ignore[attr-defined, no-any-return]
        return None

    verifier = dkim.DKIM(message)
    count = sum(1 for name, _ in verifier.headers if name.lower() == b"dkim-signature")
    verdicts = []
    for i in range(count):
        try:
            verdicts.append(bool(verifier.verify(idx=i, dnsfunc=dnsfunc)))
        except dkim.DKIMException:  # e.g. "body hash mismatch" is raised, not returned
            verdicts.append(False)
    return verdicts


def require_root_for_opendkim() -> None:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("OpenDKIM's resolver needs root: a fixture DNS on port 53 and a mount ns")
    if shutil.which("opendkim-testmsg") is None:
        pytest.fail("opendkim-testmsg is missing: run `make system-deps` (opendkim-tools)")


def opendkim_testmsg(
    message: bytes, zones: dict[str, Any], *args: str
) -> subprocess.CompletedProcess[bytes]:
    """Run ``opendkim-testmsg ARGS`` on ``message`` with DNS answered from ``zones`` only."""
    require_root_for_opendkim()
    with tempfile.TemporaryDirectory(prefix="opendkim-") as tmp:
        resolv = Path(tmp) / "resolv.conf"
        resolv.write_text(f"nameserver {OPENDKIM_DNS_HOST}\noptions attempts:1 timeout:2\n")
        with DnsServer(zones, host=OPENDKIM_DNS_HOST, port=53):
            return subprocess.run(
                [
                    "unshare",
                    "-m",
                    "sh",
                    "-c",
                    f'mount --bind {resolv} /etc/resolv.conf && exec opendkim-testmsg "$@"',
                    "opendkim-testmsg",
                    *args,
                ],
                input=message,
                capture_output=True,
                timeout=60,
            )


def to_crlf(data: bytes) -> bytes:
    """Maildir files have LF line ends; the wire form has CRLF."""
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def without_signature(message: bytes, keep: bytes) -> bytes:
    """The message with only the DKIM-Signature fields containing ``keep`` (e.g. b"a=rsa")."""
    header, sep, body = message.partition(b"\r\n\r\n")
    fields: list[bytes] = []
    for line in header.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b"\r\n" + line
        else:
            fields.append(line)
    kept = [
        f
        for f in fields
        if not f.lower().startswith(b"dkim-signature:") or keep in f.replace(b"\r\n\t", b" ")
    ]
    return b"\r\n".join(kept) + sep + body


def postillon_verify(message: bytes, nameserver: str) -> list[str]:
    """postillon's own DKIM verifier (checks/dkim_check.py, the one the MX listener runs),
    keys fetched through its resolver from the fixture DNS: one result per signature."""
    import asyncio

    from postillon.checks.dkim_check import check_dkim
    from postillon.dns.dnspython_resolver import DnsResolver

    async def run() -> list[str]:
        resolver = DnsResolver([nameserver], timeout=1.0, attempts=1)
        return [r.result for r in await check_dkim(resolver, message)]

    return asyncio.run(run())
