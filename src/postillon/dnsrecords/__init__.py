"""The DNS records a domain publishes so its mail is delivered and trusted.

Design note
-----------
``records.py`` is pure: from the configuration and the DKIM keys it computes what should be
published for a domain (MX, SPF for the domain and the HELO name, DKIM, DMARC, MTA-STS,
TLS-RPT), as zone-file lines with a comment each. ``check.py`` looks each of them up through
postillon's own resolver (so ``[dns] nameservers`` applies) and turns what it finds into a
checklist of results: ok, warn (recommended but missing) or fail (missing or wrong). The CLI
(``postillon dns records|check``) only renders them.
"""
