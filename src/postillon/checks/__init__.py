"""Policy checks, one per file.

Relay and submission: ``relay.py`` (who may send where), ``sender_policy.py``,
``rate_limit.py``.

Inbound authentication on MX listeners, run at end of data before the commit
(``authentication.py`` orchestrates; ``auth_policy.py`` decides):
``spf_check.py`` (pyspf), ``dkim_check.py`` (postillon's own ``dkimcore``, in a
helper process when there is one: ``dkimcore/remote.py``), ``dmarc_check.py``
(RFC 7489 on top of those), ``arc_check.py`` (verify and seal with dkimpy, the
one user of ``dkim_speedups.py``, which is why dkimpy is pinned),
``authresults.py`` (the RFC 8601 header), ``blocking_dns.py`` (the libraries'
lookups, through postillon's resolver).
"""
