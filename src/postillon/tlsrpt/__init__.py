"""SMTP TLS reporting (RFC 8460): record each outbound session's TLS result, report daily.

Design note
-----------
Where things live:

* ``labels.py`` - pure: the one table from postillon's TLS result labels (the
  ``postillon_outbound_tls_sessions_total`` metric's) to RFC 8460 §4.3 result
  types, and which sessions are not reported at all.
* ``recorder.py`` - the ``outbound.tls_observer.TlsObserver`` the SMTP transport
  calls for every MX session: adds to an in-memory counter (nothing on the
  delivery path waits for storage) and flushes the counters to the queue store
  (``store.tls_reports``, shared by every node) every ``flush_interval`` and at stop.
* ``policy_record.py`` - pure: the ``_smtp._tls`` TXT record (RFC 8460 §3) → where
  to send (``rua=mailto:``/``https:``), or why not.
* ``report.py`` - pure: one day's counters of one policy domain → the §4 JSON
  report, gzipped, with its §5.1 file name.
* ``message.py`` - pure: the §5.3 report message (headers, ``multipart/report``).
* ``reporter.py`` - one day: per policy domain, look up its TXT, build, claim
  (one node of a cluster sends each report), send - mail through ``intake``
  (the one way into the queue; it DKIM-signs what the config says), HTTPS by POST.
* ``schedule.py`` - the daily background task, on an injected clock.

Nothing here fails a delivery: a recording or reporting problem is a log line.
"""
