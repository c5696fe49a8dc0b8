"""The production config ``postillon setup`` writes, as commented TOML.

A template rather than a serialised model: the operator reads and edits this file, so
every section says what it is for. ``check-config`` loads the result in the tests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SetupOptions", "render_config"]

LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"


@dataclass(frozen=True)
class SetupOptions:
    hostname: str
    domains: tuple[str, ...]
    admin_email: str
    user: str = "postillon"
    data_dir: Path = Path("/var/lib/postillon")
    listen_host: str = "0.0.0.0"
    # smtp (MX), submissions (implicit TLS), submission (STARTTLS): RFC 5321, 8314, 6409.
    ports: tuple[int, int, int] = (25, 465, 587)
    admin_listen: str = "127.0.0.1:8025"
    acme_directory: str = LETS_ENCRYPT
    acme_email: str | None = None
    # The CA bundle for the ACME server's HTTPS when it is not publicly trusted (a
    # company's own ACME CA such as step-ca, or Pebble in a lab).
    acme_ca_file: Path | None = None
    # ACME's TLS-ALPN-01 challenge and the MTA-STS policy share this HTTPS port (RFC 8737).
    https_port: int = 443
    # No ACME: a self-signed certificate, for a host the CA cannot reach (a lab, a relay
    # behind NAT). Opportunistic TLS between MTAs accepts it; mail programs will warn.
    self_signed: bool = False


def _q(value: str) -> str:
    return json.dumps(value)  # a TOML basic string is a JSON string for these values


def _listen(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _tls_section(options: SetupOptions) -> list[str]:
    acme_lines = [
        "acme = true",
        f"acme_directory = {_q(options.acme_directory)}",
        f"acme_email = {_q(options.acme_email or options.admin_email)}",
    ]
    if options.acme_ca_file is not None:
        acme_lines.append(f"acme_ca_file = {_q(str(options.acme_ca_file))}")
    if not options.self_signed:
        return [
            "[tls]",
            "# Certificates from an ACME CA (Let's Encrypt by default) for the hostname and",
            "# mta-sts.<domain>; obtained at start, renewed at two thirds of their lifetime.",
            *acme_lines,
            "",
            "[mta_sts]",
            "# HTTPS for the ACME TLS-ALPN-01 challenge and our MTA-STS policy",
            "# (https://mta-sts.<domain>/.well-known/mta-sts.txt, RFC 8461).",
            f"listen = {_q(_listen(options.listen_host, options.https_port))}",
        ]
    return [
        "[tls]",
        "# A self-signed certificate is made in data_dir/tls (setup --self-signed):",
        "# opportunistic TLS between MTAs accepts it; mail programs on 465/587 will warn.",
        "# For certificates from an ACME CA, replace this line with:",
        *(f"# {line}" for line in acme_lines),
        "self_signed = true",
    ]


def render_config(options: SetupOptions, written_on: str) -> str:
    smtp, submissions, submission = options.ports
    admin_local, _, admin_domain = options.admin_email.rpartition("@")
    lines = [
        f"# postillon configuration, written by `postillon setup` on {written_on}.",
        "# Check it with `postillon check-config`; apply changes with `systemctl reload",
        "# postillon` (SIGHUP). Every key is described in docs/configuration.md.",
        f"hostname = {_q(options.hostname)}",
        f"data_dir = {_q(str(options.data_dir))}",
        "# The server starts as root to bind the ports, then runs as this user.",
        f"user = {_q(options.user)}",
        "",
        "[[listen]]",
        'kind = "smtp"             # port 25: mail from other servers (MX)',
        f"address = {_q(_listen(options.listen_host, smtp))}",
        "",
        "[[listen]]",
        'kind = "submissions"      # port 465: mail programs, TLS from the first byte (RFC 8314)',
        f"address = {_q(_listen(options.listen_host, submissions))}",
        "",
        "[[listen]]",
        'kind = "submission"       # port 587: mail programs, STARTTLS then AUTH (RFC 6409)',
        f"address = {_q(_listen(options.listen_host, submission))}",
        "",
        *_tls_section(options),
        "",
        "[limits]",
        "message_size = 52428800     # 50 MiB (RFC 1870 SIZE)",
        "connections = 1000",
        "connections_per_ip = 50",
        "",
        "[submission]",
        "# Users may send only as their own addresses; a stolen password is rate-limited.",
        'sender_policy = "enforce"',
        "messages_per_hour = 500",
        "",
        "[dkim]",
        "# Outgoing mail is signed with every key in data_dir/dkim/<domain>/ (Ed25519 and",
        "# RSA, made by setup; `postillon dkim list` shows them).",
        "sign = true",
        "",
        "[admin]",
        "# The admin page and API, on loopback only (token: `postillon admin token`).",
        f"listen = {_q(options.admin_listen)}",
    ]
    for domain in options.domains:
        # The admin receives postmaster@ (RFC 5321 4.5.1), abuse@ and hostmaster@
        # (RFC 2142) and root@ of every domain.
        target = admin_local if domain == admin_domain else options.admin_email
        mailboxes = [admin_local] if domain == admin_domain else []
        aliases = {
            name: [target]
            for name in ("postmaster", "abuse", "hostmaster", "root")
            if not (domain == admin_domain and name == admin_local)
        }
        alias_text = ", ".join(f"{name} = {json.dumps(t)}" for name, t in aliases.items())
        lines += [
            "",
            "[[domain]]",
            f"name = {_q(domain)}",
            f"mailboxes = {json.dumps(mailboxes)}",
            f"aliases = {{ {alias_text} }}",
        ]
    return "\n".join(lines) + "\n"
