"""What postillon tells its operator: the mail log, syslog output and the metrics.

Design note (two minutes)
-------------------------
``maillog.py`` is the mail log: one structured line per event (``received``,
``delivered``, ``deferred``, ``bounced``, ...), each with the queue id, so ``grep QUEUEID``
tells a message's whole story; text or JSON, to a file or (``syslog.py``, RFC 5424/3164
framing as pure functions) the local syslog socket. ``metrics.py`` is the one registry of
every Prometheus metric; ``routes.py`` serves ``/metrics`` and ``/api/reload`` on the admin
server.

May import (DESIGN.md "Rooms"): ``core`` (and ``config`` model types). Every room may
import this one.

Rules kept everywhere:

* No module-level state: one ``MailLog`` and one ``Metrics`` per process, built by the
  composition root and handed to the components that log or count.
* Cheap on the hot path: labelled metric children are resolved once (per listener, per
  session), then only ``inc()``/``observe()``; label values come from small closed sets.
* Never a secret in a log line or a label (no passwords, no tokens, no message content).
"""
