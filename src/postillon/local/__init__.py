"""Delivery on this machine: Maildir.

Design note (two minutes)
-------------------------
``maildir.py`` delivers one message into one mailbox durably; its note lists the steps
(tmp → fsync → link into ``new/`` → fsync the directory) and the reply each failure maps
to. ``dirsync.py`` shares that directory fsync between deliveries into the same
``new/`` running at once (group commit). ``transport.py`` is the adapter the delivery
runner calls: one thread hop per message (the disk blocks), one outcome per recipient.
LMTP to an MDA and the discard/error transports are planned for this room (DESIGN.md
"Rooms").

May import (DESIGN.md "Rooms"): ``core``, ``protocol``, and the transport contract
(``delivery.transport``), never the runner (and ``observability``, ``config`` model types).

Rules kept everywhere:

* Outcomes are values: ``Delivered``, ``TempFail`` or ``PermFail`` per recipient, never an
  exception across the boundary; an error nobody expected counts as temporary.
* A delivery is either complete and durable or not visible at all: nothing half-written
  stays in ``new/``, and a disk that is full is a temporary failure (``452 4.2.2``).
* Mailbox paths come from validated addresses only, and never escape the mail root.
"""
