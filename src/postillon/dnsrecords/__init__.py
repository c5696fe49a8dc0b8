"""The DNS records a domain publishes so its mail is delivered and trusted.

Design note
-----------
``records.py`` is pure: from the configuration and the DKIM keys it computes what should be
published for a domain (MX, SPF for the domain and the HELO name, DKIM, DMARC, MTA-STS,
TLS-RPT), as zone-file lines with a comment each. ``check.py`` looks each of them up through
postillon's own resolver (so ``[dns] nameservers`` applies) and turns what it finds into a
checklist of results: ok, warn (recommended but missing) or fail (missing or wrong). The CLI
(``postillon dns records|check``) only renders them.

MTA-STS (RFC 8461): ``core/sts.py`` writes and parses policy files (pure, and our own
output must parse back unchanged); ``dns/sts_fetch.py`` fetches anyone's as a sender would
(both shared with outbound enforcement); ``sts_server.py`` serves this server's own
for its local domains (``[mta_sts] listen``), with the SMTP certificate.
``records.served_policy`` is the one place the policy is made from the config: the
server serves its text and ``dns records`` derives the ``_mta-sts`` id from the same
text, so the id changes exactly when the policy does.
"""
