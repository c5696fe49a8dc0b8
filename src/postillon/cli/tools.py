"""The commands other than ``serve``, imported together and only when one of them runs:
``postillon serve`` never loads them (rich, asyncpg, the Postfix importer, provisioning;
about 6 MiB PSS, bench/README.md "Memory")."""

from postillon.cli import (
    admin_cmd,
    db_cmd,
    dkim_cmd,
    dmarc_cmd,
    dns_cmd,
    docs_cmd,
    explain_cmd,
    import_postfix_cmd,
    queue_cmd,
    reload_cmd,
    setup_cmd,
    tls_cmd,
    user_cmd,
)

__all__ = [
    "admin_cmd",
    "db_cmd",
    "dkim_cmd",
    "dmarc_cmd",
    "dns_cmd",
    "docs_cmd",
    "explain_cmd",
    "import_postfix_cmd",
    "queue_cmd",
    "reload_cmd",
    "setup_cmd",
    "tls_cmd",
    "user_cmd",
]
