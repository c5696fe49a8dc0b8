"""What a user of postillon can test their own setup with.

Design note (two minutes)
-------------------------
* ``transcript.py``: SMTP dialogues, one per text file, played against a
  ``ServerConnection`` in memory (or any peer with the same five methods); the file format
  is in its note.
* ``dns_server.py``: a small authoritative DNS server on loopback (UDP and TCP) serving
  zones given as data or zone-file text, with programmable failures and a query log;
  ``dns_zones.py`` holds its zones and builds its answers. Also ``python -m
  postillon.testing.dns_server --zone FILE``.
* ``dkim_keys.py``: a new RSA key and the TXT record that publishes it.

May import (DESIGN.md "Rooms"): anything; nothing in ``src/`` imports this package.

Rules kept everywhere:

* Loopback only by default, and nothing here asks the machine's resolver: a test serves
  every name it needs.
* Only what an operator would use: harnesses for other programs (Postfix, Dovecot,
  PostgreSQL, an HTTPS server, postillon's own server process) live in ``tests/support/``.
"""
