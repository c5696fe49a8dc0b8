"""What import-postfix leaves out, and why (the comments at the end of its output)."""

from __future__ import annotations

__all__ = ["INTERNAL", "REASONS", "STANDARD_SERVICES"]

# Parameters that only say where Postfix keeps its own files or how it runs its own
# processes: nothing to carry over, and not worth a comment each.
INTERNAL = frozenset(
    [
        "queue_directory",
        "command_directory",
        "daemon_directory",
        "data_directory",
        "mail_owner",
        "setgid_group",
        "compatibility_level",
        "shlib_directory",
        "meta_directory",
        "manpage_directory",
        "sample_directory",
        "readme_directory",
        "html_directory",
        "sendmail_path",
        "newaliases_path",
        "mailq_path",
        "inet_protocols",
        "biff",
        "append_dot_mydomain",
        "alias_database",
        "maillog_file",
        "maillog_file_prefixes",
        "readme_directory",
        "smtp_dns_support_level",
        "myorigin",
        "mydomain",
        "smtpd_tls_session_cache_database",
        "smtp_tls_session_cache_database",
        "smtp_tls_CApath",
        "smtp_tls_CAfile",
        "smtpd_tls_CApath",
        "smtpd_tls_CAfile",
        "tls_random_source",
        "smtp_sasl_auth_enable",
        "smtp_sasl_password_maps",
        "smtp_sasl_security_options",
        "smtp_tls_wrappermode",
        "proxy_interfaces",
        "local_recipient_maps",
    ]
)
# Why the common settings that have no postillon equivalent were not translated.
REASONS: tuple[tuple[str, str], ...] = (
    (
        r"smtpd_\w*restrictions$",
        "Postfix restriction lists have no one-to-one equivalent: postillon relays only "
        "for [relay] trusted_networks and authenticated users, and checks SPF, DKIM, DMARC "
        "in [authentication]",
    ),
    (
        r"smtpd_sasl_",
        "postillon authenticates submission users itself: add them with `postillon user "
        "add` (passwords in Dovecot or SASL databases cannot be imported)",
    ),
    (r"(smtpd?|lmtp)_tls_", "postillon's TLS settings are [tls] min_version and certificates"),
    (r"(smtpd|non_smtpd)_milters$", "milters are not configured from the Postfix setting"),
    (r"(header|body|mime_header|nested_header)_checks$", "content checks: use a milter"),
    (
        r"virtual_(uid|gid)_maps$|virtual_mailbox_base$",
        "postillon writes Maildirs as its own user under data_dir/mail/<domain>/<user>: "
        "move the existing mail there when switching",
    ),
    (
        r"home_mailbox$|mailbox_command$|mailbox_transport$|mail_spool_directory$",
        "local(8) delivery: postillon delivers to Maildirs under data_dir, or by LMTP "
        '([[transport]] route = "lmtp:...")',
    ),
    (r"smtpd_banner$", "postillon's greeting names its hostname"),
    (r"\w*_destination_\w*limit$|\w*_process_limit$", "postillon has its own concurrency limits"),
)
# master.cf services that are Postfix's own machinery, or the examples Debian's
# master.cf ships (maildrop, uucp, ...): by service name.
STANDARD_SERVICES = frozenset(
    [
        "pickup",
        "cleanup",
        "qmgr",
        "oqmgr",
        "tlsmgr",
        "rewrite",
        "bounce",
        "defer",
        "trace",
        "verify",
        "flush",
        "proxymap",
        "proxywrite",
        "smtp",
        "relay",
        "showq",
        "error",
        "retry",
        "discard",
        "local",
        "virtual",
        "lmtp",
        "anvil",
        "scache",
        "postlog",
        "smtpd",
        "dnsblog",
        "tlsproxy",
        "postscreen",
        "maildrop",
        "uucp",
        "ifmail",
        "bsmtp",
        "scalemail-backend",
        "mailman",
        "smtps",
        "submission",
        "submissions",
    ]
)
