"""DMARC aggregate reports (RFC 7489 §7.2): record each inbound evaluation, report daily.

Design note
-----------
The same structure as ``tlsrpt/`` (SMTP TLS reports), for the other direction:

* ``recorder.py`` - the ``checks.authentication.DmarcObserver``: each DMARC evaluation
  of a domain whose record has ``rua=`` adds 1 to an in-memory counter (nothing on the
  SMTP path waits for storage), flushed to the queue store
  (``store.policy_state.dmarc_reports``, shared by every node) every ``flush_interval``
  and at stop.
* ``destinations.py`` - pure plus one lookup: the ``rua=`` URIs (``mailto:`` with an
  optional ``!size`` limit, §6.2) and the external-destination verification of §7.1:
  a destination outside the policy domain's organisational domain gets reports only if
  ``<policy domain>._report._dmarc.<destination domain>`` has a ``v=DMARC1`` TXT record.
* ``report.py`` - pure: one day's counters of one policy domain → the Appendix C XML,
  gzipped, with its §7.2.1.1 file name.
* ``message.py`` - pure: the §7.2.1.1 report message.
* ``reporter.py`` - one day: per policy domain, look up its DMARC record again (the rua=
  of today), verify destinations, build, claim (one node of a cluster sends each
  report), and mail it through ``intake`` (the one way into the queue; intake
  DKIM-signs for the From domain when a key exists).

The daily task is ``tlsrpt.schedule.DailyReports`` (generic: a clock, an hour, a run),
composed in ``app.py``. Nothing here fails a message: a recording or reporting problem is
a log line.
"""
