"""Mail coming in: listeners, the SMTP session driver, STARTTLS, AUTH, privilege drop.

Design note (two minutes)
-------------------------
``listener.py`` binds the sockets and admits connections (``limits.py``: total sessions
and sessions per client IP, ``421 4.7.0`` past either). ``session.py`` is the thin asyncio
adapter around the sans-IO ``protocol.ServerConnection``: it moves bytes between socket
and core, applies the timeouts, and answers each decision event from ``checks`` and
``intake``. ``tls.py`` makes the listeners' TLS contexts (a self-signed certificate on
first run: opportunistic TLS, RFC 7435). ``auth.py`` answers the core's SASL questions from
``accounts.py`` (the accounts file: hashed passwords, SASLprep, SCRAM keys).
``privileges.py`` drops root once the sockets are bound.

May import (DESIGN.md "Rooms"): ``core``, ``protocol``, ``checks``, ``intake`` (and
``observability``, ``config`` model types).

Rules kept everywhere:

* Protocol and I/O only: every policy decision comes from ``checks``, every write to the
  queue goes through ``intake``; the session never parses SMTP itself.
* Every read has a timeout (command and data timeouts, RFC 5321 §4.5.3.2), and every
  resource a client controls has a limit.
* The peer hears a short generic reply with an enhanced status code; the details go to
  the mail log. An exception is never echoed to a client.
* Connection state (the session: peer, TLS, HELO name) and transaction state (the intake
  transaction) are separate objects.
"""
