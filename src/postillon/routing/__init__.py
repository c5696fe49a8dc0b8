"""Recipient → route: is an address ours, what does it expand to, where does it go.

Design note (two minutes)
-------------------------
``local.py`` answers RCPT TO for local domains (mailboxes, catch-alls, sub-addressing) and
tells delivery whether a final address is a real mailbox; ``aliases.py`` reads alias tables
in ``/etc/aliases`` form. ``router.py`` picks, at delivery time, how each stored recipient
travels: a ``[[transport]]`` rule, a local Maildir, a smarthost, or the domain's MX hosts
(whose order ``outbound/mx.py`` works out at delivery time). The resolver is in ``dns/``.

May import (DESIGN.md "Rooms"): ``core`` and the ``dns`` resolver protocol (and
``observability``, ``config`` model types).

Rules kept everywhere:

* Pure where it can be: tables are built once from the frozen config and then only looked
  up (no I/O, no clock), so they are safe to share between tasks and threads.
* Domains are compared in A-label form (``core.address.domain_to_ascii``, IDNA 2008), local
  parts case-insensitively; an address is never reinterpreted (no percent hack, no bang
  paths).
"""
