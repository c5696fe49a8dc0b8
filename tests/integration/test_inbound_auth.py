"""Inbound SPF, DKIM and DMARC through the real server, against test zones on the
loopback DNS server.

    smtplib from 127.0.0.2 / 127.0.0.5 ──▶ postillon (MX listener, checks on)
        │ SPF, DKIM keys, DMARC records ──▶ DnsServer on 127.0.0.1 (the only DNS)
        └──▶ 250 + Authentication-Results in the Maildir file, or 550 / 451

The client's source address is bound so that SPF sees different IPs: the
zones authorise 127.0.0.2 and nothing else. Mail signed by OpenDKIM
(``opendkim-testmsg``) must verify here (``dkim=pass``).
"""

from __future__ import annotations

import email
import email.policy
import os
import re
import shutil
import signal
import smtplib
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from postillon.testing.dns_server import DnsServer
from support.server import ServerProcess, default_config, is_helper

pytestmark = pytest.mark.integration

AUTHORISED_IP = "127.0.0.2"
OTHER_IP = "127.0.0.5"
HOST = "mx.test.example"  # default_config's hostname: our authserv-id

OK = 250
DMARC_REJECTED = (550, "5.7.1")
SPF_REJECTED = (550, "5.7.23")
DMARC_DEFERRED = (451, "4.7.1")
SPF_DEFERRED = (451, "4.7.24")


def spf(text: str) -> dict[str, Any]:
    return {"TXT": f'"{text}"'}


def dmarc(policy: str) -> dict[str, Any]:
    return {"TXT": f'"v=DMARC1; p={policy}"'}


def base_zones(dkim_record: str) -> dict[str, Any]:
    only_2 = "v=spf1 ip4:127.0.0.2 -all"
    return {
        "pass.test": {"@": spf(only_2)},
        "fail.test": {"@": spf("v=spf1 ip4:192.0.2.1 -all")},
        "partner.test": {"@": spf("v=spf1 ip4:192.0.2.1 -all")},
        "softfail.test": {"@": spf("v=spf1 ip4:192.0.2.1 ~all")},
        "neutral.test": {"@": spf("v=spf1 ?all")},
        "nospf.test": {"@": {"A": "192.0.2.7"}},
        "temperror.test": {"@": spf(only_2)},  # its TXT lookups SERVFAIL (below)
        "permerror.test": {"@": {"TXT": ['"v=spf1 -all"', '"v=spf1 +all"']}},  # RFC 7208 4.5
        "reject.test": {"@": spf(only_2), "_dmarc.reject.test": dmarc("reject")},
        "quarantine.test": {"@": spf(only_2), "_dmarc.quarantine.test": dmarc("quarantine")},
        "monitor.test": {"@": spf(only_2), "_dmarc.monitor.test": dmarc("none")},
        # p=reject rolled out to 0% of failing mail: they get the next weaker policy.
        "rollout.test": {"@": spf(only_2), "_dmarc.rollout.test": dmarc("reject; pct=0")},
        "dmarctemp.test": {"@": spf(only_2), "_dmarc.dmarctemp.test": dmarc("reject")},
        "signed.test": {
            "@": spf("v=spf1 -all"),
            "sel._domainkey.signed.test": {"TXT": dkim_record},
            "_dmarc.signed.test": dmarc("reject"),
        },
    }


@pytest.fixture(scope="module")
def dkim_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """An OpenDKIM key pair for signed.test (selector ``sel``) and its TXT record."""
    if shutil.which("opendkim-genkey") is None:
        pytest.fail("opendkim-genkey missing: install opendkim-tools (make system-deps)")
    keydir = tmp_path_factory.mktemp("dkim")
    subprocess.run(
        ["opendkim-genkey", "-D", str(keydir), "-d", "signed.test", "-s", "sel"], check=True
    )
    text = (keydir / "sel.txt").read_text()
    public = "".join(re.findall(r'"([^"]*)"', text))
    p = re.search(r"p=([A-Za-z0-9+/=]+)", public)
    assert p is not None
    # Without OpenDKIM's "h=sha256": opendkim-testmsg signs with rsa-sha1.
    value = f"v=DKIM1; k=rsa; p={p.group(1)}"
    # One TXT record of 255-octet strings (RFC 6376 3.6.2.2 joins them).
    record = " ".join(f'"{value[i : i + 255]}"' for i in range(0, len(value), 255))
    return keydir / "sel.private", record


@pytest.fixture(scope="module")
def dns(dkim_key: tuple[Path, str]) -> Iterator[DnsServer]:
    with DnsServer(base_zones(dkim_key[1])) as server:
        server.set_failure("temperror.test", "servfail", rdtype="TXT")
        server.set_failure("_dmarc.dmarctemp.test", "servfail", rdtype="TXT")
        yield server


def start_server(
    root: Path,
    dns: DnsServer,
    relay: dict[str, Any] | None = None,
    helper_processes: int | str = "auto",
    **authentication: Any,
) -> ServerProcess:
    root.mkdir()
    config = default_config(
        root,
        dns={"nameservers": [dns.nameserver], "timeout": 1.0, "attempts": 1},
        authentication={"enabled": True, **authentication},
        relay=relay or {"trusted_networks": []},
        helper_processes=helper_processes,
    )
    return ServerProcess(root, config).start()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, dns: DnsServer) -> Iterator[ServerProcess]:
    """Default (cautious) actions."""
    proc = start_server(tmp_path_factory.mktemp("auth") / "srv", dns)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def strict_server(
    tmp_path_factory: pytest.TempPathFactory, dns: DnsServer
) -> Iterator[ServerProcess]:
    """SPF fail rejected (spf_fail = "reject"), with an allowlisted partner domain."""
    proc = start_server(
        tmp_path_factory.mktemp("auth") / "strict",
        dns,
        spf_fail="reject",
        allow_domains=["partner.test"],
        relay={"trusted_networks": ["127.0.0.6/32"]},
    )
    yield proc
    proc.stop()


_counter = iter(range(1_000_000))


def message(author: str, subject: str, extra: str = "") -> bytes:
    return (
        f"From: {author}\r\nTo: alice@example.org\r\nSubject: {subject}\r\n"
        f"Date: Sat, 28 Nov 2026 18:00:00 +0000\r\nMessage-ID: <{subject}@test>\r\n"
        f"{extra}\r\nhello\r\n"
    ).encode()


def send(
    server: ServerProcess,
    mail_from: str,
    body: bytes,
    source: str = AUTHORISED_IP,
    helo: str = "mta.pass.test",
) -> tuple[int, str]:
    host, _, port = server.config["listen"][0]["address"].rpartition(":")
    with smtplib.SMTP(host, int(port), timeout=20, source_address=(source, 0)) as s:
        s.ehlo(helo)
        s.mail(mail_from)
        assert s.rcpt("alice@example.org")[0] == 250
        try:
            code, reply = s.data(body)
        except smtplib.SMTPDataError as exc:
            code, reply = exc.smtp_code, exc.smtp_error
    return code, reply.decode()


def delivered(server: ServerProcess, subject: str) -> email.message.EmailMessage:
    """The Maildir copy of the message with this subject."""
    for _ in range(400):
        for path in server.iter_all_mail():
            data = path.read_bytes()
            if (
                f"Subject: {subject}\r\n".encode() in data
                or f"Subject: {subject}\n".encode() in data
            ):
                parsed = email.message_from_bytes(data, policy=email.policy.compat32)
                return parsed  # type: ignore[return-value]
        import time

        time.sleep(0.05)
    raise AssertionError(f"{subject}: not delivered\n{server.maillog()[-2000:]}")


def our_results(msg: email.message.EmailMessage) -> str:
    fields = [v for v in msg.get_all("Authentication-Results", []) if v.strip().startswith(HOST)]
    assert len(fields) == 1, fields
    return re.sub(r"\s+", " ", fields[0])


def accept(server: ServerProcess, mail_from: str, author: str, **kw: Any) -> tuple[str, Any]:
    subject = f"t{next(_counter)}"
    code, reply = send(server, mail_from, message(author, subject), **kw)
    assert code == OK, reply
    msg = delivered(server, subject)
    return our_results(msg), msg


def refuse(
    server: ServerProcess, mail_from: str, author: str, expected: tuple[int, str], **kw: Any
) -> str:
    code, reply = send(server, mail_from, message(author, f"r{next(_counter)}"), **kw)
    assert (code, reply.split()[0]) == expected, reply
    return reply


# -- SPF: every result, seen in the delivered header -------------------------------------


@pytest.mark.parametrize(
    ("domain", "result"),
    [
        ("pass.test", "pass"),
        ("softfail.test", "softfail"),
        ("neutral.test", "neutral"),
        ("nospf.test", "none"),
        ("temperror.test", "temperror"),
        ("permerror.test", "permerror"),
        ("fail.test", "fail"),
    ],
)
def test_spf_result_in_authentication_results(
    server: ServerProcess, domain: str, result: str
) -> None:
    results, msg = accept(server, f"bob@{domain}", f"bob@{domain}")
    assert results.startswith(f"{HOST}; spf={result}")
    assert f"smtp.mailfrom=bob@{domain}" in results
    assert "spf=none" in results and "smtp.helo=mta.pass.test" in results  # HELO identity
    # Default: an SPF fail is marked, not refused (forwarding breaks SPF).
    assert ("X-Postillon-Quarantine" in msg) == (result == "fail")


def test_spf_depends_on_the_client_address(server: ServerProcess) -> None:
    results, _ = accept(server, "bob@pass.test", "bob@pass.test", source=OTHER_IP)
    assert "spf=fail" in results


def test_spf_fail_rejected_when_configured(strict_server: ServerProcess) -> None:
    reply = refuse(strict_server, "bob@fail.test", "bob@fail.test", SPF_REJECTED)
    assert "RFC 7208" in reply
    # ...and a DNS failure on the way is a 451, not a rejection.
    refuse(strict_server, "bob@temperror.test", "bob@temperror.test", SPF_DEFERRED)
    results, _ = accept(strict_server, "bob@pass.test", "bob@pass.test")
    assert "spf=pass" in results


def test_allowlisted_domain_is_accepted_and_still_reported(strict_server: ServerProcess) -> None:
    results, msg = accept(strict_server, "bob@partner.test", "bob@partner.test")
    assert "spf=fail" in results
    assert msg["X-Postillon-Quarantine"] is None
    assert "action=accept, reason=allowlisted" in strict_server.maillog()


# -- DMARC: policies with aligned and unaligned identities --------------------------------


def test_dmarc_reject_aligned_passes(server: ServerProcess) -> None:
    results, _ = accept(server, "bob@reject.test", "Bob <bob@reject.test>")
    assert "dmarc=pass" in results and "header.from=reject.test" in results


def test_dmarc_reject_unaligned_is_refused(server: ServerProcess) -> None:
    # SPF passes for pass.test, but that is not the author's domain.
    reply = refuse(server, "bob@pass.test", "bob@reject.test", DMARC_REJECTED)
    assert "DMARC" in reply and "reject.test" in reply
    assert "dmarc=fail" in server.maillog()


def test_dmarc_quarantine_unaligned_is_marked(server: ServerProcess) -> None:
    results, msg = accept(server, "bob@pass.test", "bob@quarantine.test")
    assert "dmarc=fail" in results and "header.from=quarantine.test" in results
    assert "quarantine" in msg["X-Postillon-Quarantine"]


def test_dmarc_quarantine_aligned_is_clean(server: ServerProcess) -> None:
    results, msg = accept(server, "bob@quarantine.test", "bob@quarantine.test")
    assert "dmarc=pass" in results
    assert msg["X-Postillon-Quarantine"] is None


def test_dmarc_none_policy_only_reports(server: ServerProcess) -> None:
    results, msg = accept(server, "bob@pass.test", "bob@monitor.test")
    assert "dmarc=fail" in results and "p=none" in results
    assert msg["X-Postillon-Quarantine"] is None
    results, _ = accept(server, "bob@monitor.test", "bob@monitor.test")
    assert "dmarc=pass" in results


def test_dmarc_pct_below_100_applies_the_weaker_policy_to_unsampled_mail(
    server: ServerProcess,
) -> None:
    """RFC 7489 6.6.4: p=reject with pct=0 picks no failing message for rejection;
    each gets quarantine instead."""
    results, msg = accept(server, "bob@pass.test", "bob@rollout.test")
    assert "dmarc=fail" in results and "pct=0 dis=quarantine" in results
    assert "quarantine" in msg["X-Postillon-Quarantine"]


def test_dmarc_dns_failure_defers(server: ServerProcess) -> None:
    refuse(server, "bob@dmarctemp.test", "bob@dmarctemp.test", DMARC_DEFERRED)


def test_null_sender_uses_helo_identity(server: ServerProcess) -> None:
    results, _ = accept(server, "", "mailer-daemon@pass.test", helo="pass.test")
    assert "spf=pass" in results and "smtp.mailfrom=postmaster@pass.test" in results


# -- DKIM: OpenDKIM signs, postillon verifies ---------------------------------------------


def opendkim_sign(key: Path, body: bytes) -> bytes:
    if shutil.which("opendkim-testmsg") is None:
        pytest.fail("opendkim-testmsg missing: install opendkim-tools (make system-deps)")
    out = subprocess.run(
        ["opendkim-testmsg", "-C", "-d", "signed.test", "-s", "sel", "-k", str(key)],
        input=body,
        capture_output=True,
        check=True,
    ).stdout
    return out.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def test_opendkim_signed_mail_verifies(server: ServerProcess, dkim_key: tuple[Path, str]) -> None:
    subject = f"dkim{next(_counter)}"
    signed = opendkim_sign(dkim_key[0], message("Alice <a@signed.test>", subject))
    assert signed.startswith(b"DKIM-Signature:")
    # SPF fails (signed.test publishes "-all"), but the aligned DKIM pass
    # satisfies DMARC p=reject.
    code, reply = send(server, "a@signed.test", signed)
    assert code == OK, reply
    results = our_results(delivered(server, subject))
    assert "dkim=pass" in results and "header.d=signed.test" in results
    assert "header.s=sel" in results and "dmarc=pass" in results and "spf=fail" in results


def test_dkim_is_still_verified_when_the_helper_process_dies(
    tmp_path: Path, dns: DnsServer, dkim_key: tuple[Path, str]
) -> None:
    """postillon.helpers: signatures are verified in a helper process; killed, the
    server verifies inline (same verdict, nothing refused or lost), and stopping the
    server leaves no helper behind."""
    server = start_server(tmp_path / "srv", dns, helper_processes=1)
    try:
        (pid,) = server.helper_pids()
        subject = f"dkim{next(_counter)}"
        signed = opendkim_sign(dkim_key[0], message("Alice <a@signed.test>", subject))
        assert send(server, "a@signed.test", signed)[0] == OK
        assert "dkim=pass" in our_results(delivered(server, subject))
        os.kill(pid, signal.SIGKILL)
        subject = f"dkim{next(_counter)}"
        signed = opendkim_sign(dkim_key[0], message("Alice <a@signed.test>", subject))
        assert send(server, "a@signed.test", signed)[0] == OK
        results = our_results(delivered(server, subject))
        assert "dkim=pass" in results and "dmarc=pass" in results
    finally:
        running = [pid, *server.helper_pids()]
        server.stop()
    assert [pid for pid in running if is_helper(pid)] == []


def test_opendkim_signed_mail_altered_in_transit_is_refused(
    server: ServerProcess, dkim_key: tuple[Path, str]
) -> None:
    signed = opendkim_sign(dkim_key[0], message("a@signed.test", f"alt{next(_counter)}"))
    altered = signed.replace(b"hello\r\n", b"hello, changed\r\n")
    code, reply = send(server, "a@signed.test", altered)
    assert (code, reply.split()[0]) == DMARC_REJECTED, reply
    assert "dkim=fail" in server.maillog()


def test_large_messages_are_dkim_verified_streaming(
    tmp_path: Path, dns: DnsServer, dkim_key: tuple[Path, str]
) -> None:
    """Above max_arc_size the body hashes come from the spool chunk by chunk
    (dkimcore/body_stream.py), never the whole message: same verdicts, pass and fail."""
    server = start_server(tmp_path / "srv", dns, max_arc_size=0, helper_processes=0)
    try:
        # Lines with blanks relaxed canonicalisation changes, empty lines at the end, and
        # more than a spool chunk (64 KiB) of body.
        lines = "".join(f"line {i}\t with  blanks \r\n" for i in range(8000)) + "\r\n\r\n"
        subject = f"big{next(_counter)}"
        body = message("Alice <a@signed.test>", subject).replace(b"hello\r\n", lines.encode())
        signed = opendkim_sign(dkim_key[0], body)
        assert len(signed) > 200_000
        code, reply = send(server, "a@signed.test", signed)
        assert code == OK, reply
        results = our_results(delivered(server, subject))
        assert "dkim=pass" in results and "dmarc=pass" in results, results
        altered = signed.replace(b"line 7000\t", b"line 7001\t")
        code, reply = send(server, "a@signed.test", altered)
        assert (code, reply.split()[0]) == DMARC_REJECTED, reply
        assert "body hash did not verify" in server.maillog() or "dkim=fail" in server.maillog()
    finally:
        server.stop()


# -- forged verdicts ------------------------------------------------------------------------


def test_forged_results_for_this_host_are_removed(server: ServerProcess) -> None:
    forged = (
        f"Authentication-Results: {HOST}; dkim=pass header.d=reject.test\r\n"
        f"Authentication-Results: {HOST.upper()} (comment);\r\n\tdmarc=pass\r\n"
        "Authentication-Results: other.example; spf=pass\r\n"
    )
    subject = f"forged{next(_counter)}"
    code, reply = send(server, "bob@pass.test", message("bob@pass.test", subject, forged))
    assert code == OK, reply
    msg = delivered(server, subject)
    results = msg.get_all("Authentication-Results")
    assert len(results) == 2, results
    assert results[0].startswith(f"{HOST};") and "spf=pass" in results[0]
    assert results[1].startswith("other.example")
    assert "dkim=pass" not in our_results(msg)


def test_trusted_relay_clients_are_not_checked(strict_server: ServerProcess) -> None:
    subject = f"trusted{next(_counter)}"
    forged = f"Authentication-Results: {HOST}; dmarc=pass header.from=reject.test\r\n"
    body = message("bob@reject.test", subject, forged)
    code, reply = send(strict_server, "bob@fail.test", body, source="127.0.0.6")
    assert code == OK, reply
    msg = delivered(strict_server, subject)
    # Not checked, and still no verdict in our name: the forged one is gone.
    assert not [v for v in msg.get_all("Authentication-Results", []) if HOST in v]


def test_odd_messages_get_a_verdict_not_a_crash(server: ServerProcess) -> None:
    """No From:, null sender, an address-literal HELO, no body at all."""
    subject = f"odd{next(_counter)}"
    body = f"Subject: {subject}\r\nX-Note: header section only".encode()
    code, reply = send(server, "", body, helo="[127.0.0.2]")
    assert code == OK, reply
    results = our_results(delivered(server, subject))
    assert "spf=none" in results and "dkim=none" in results
    assert "dmarc=permerror (0 From: fields)" in results
    # A signature that cannot be parsed is a permerror, not a failure of the session.
    subject = f"badsig{next(_counter)}"
    broken = "DKIM-Signature: v=1; a=rsa-sha256; d=signed.test; garbage\r\n"
    code, reply = send(server, "bob@pass.test", message("bob@pass.test", subject, broken))
    assert code == OK, reply
    assert "dkim=permerror" in our_results(delivered(server, subject))
