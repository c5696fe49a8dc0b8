"""DNS: the resolver protocol every room asks through, and its dnspython adapter.

Design note (two minutes)
-------------------------
Where things live:

* ``resolver.py`` - the protocol (``Resolver``: MX, A/AAAA, TXT, TLSA, PTR, each
  answer with the AD bit), the typed answers, and the two errors: ``DnsNotFound``
  (permanent) and ``DnsTempError`` (temporary). Its docstring is the contract.
* ``dnspython_resolver.py`` - ``DnsResolver``, the one real implementation:
  dnspython's asyncio stub resolver, only to the configured nameservers, with a
  bounded TTL cache (negative answers too, RFC 2308) and shared in-flight lookups.
* ``sts_fetch.py`` - the MTA-STS policy file over HTTPS (RFC 8461 §3.3), its host
  name resolved through a ``Resolver``; used by ``dns check`` and outbound delivery.

What it may use: ``core`` only (DESIGN.md's room table), and dnspython in the adapter.

Rules kept everywhere:

* Other rooms (``checks``, ``routing``, ``outbound``, ``dnsrecords``) import
  ``resolver.py`` (and ``sts_fetch.py``) only; the composition root and the CLI
  build ``DnsResolver`` and hand it in, so tests inject a fake or a resolver
  pointed at their own DNS server.
* A lookup returns an answer or raises one of the two errors; anything else that
  escapes counts as temporary at the caller's boundary, never as a bounce.
* The clock is injected (TTLs in tests advance, never sleep); a metrics hook
  never breaks a lookup.
"""
