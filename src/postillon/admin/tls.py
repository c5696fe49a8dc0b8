"""The admin server's TLS context, from [admin] or the mail server's own [tls]."""

from __future__ import annotations

import ssl

from postillon.config.model import AdminConfig, TlsConfig
from postillon.inbound.tls import server_context


class AdminTlsError(Exception):
    """admin.tls_from_server without a server certificate (the config model refuses it
    first; this guards a server whose certificate could not be loaded)."""


def admin_tls_context(
    admin: AdminConfig, tls: TlsConfig, server_tls: ssl.SSLContext | None
) -> ssl.SSLContext | None:
    if admin.tls_cert is not None and admin.tls_key is not None:
        return server_context(admin.tls_cert, admin.tls_key, tls.min_version)
    if admin.tls_from_server:
        if server_tls is None:
            raise AdminTlsError(
                "admin.tls_from_server = true, but the mail server has no certificate "
                "(set tls.certificate and tls.private_key, or tls.self_signed = true)"
            )
        return server_tls
    return None
