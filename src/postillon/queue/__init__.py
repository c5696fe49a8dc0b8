"""The queue's storage: durable state, and nothing that decides when or how to deliver.

Design note (two minutes)
-------------------------
``store.py`` is the contract every store keeps, written as a numbered transaction (read
it before changing a store): a message is stored once, its body immutable after commit,
and tracked per recipient (one delivery record each: state, attempts, next try, last
reply); claims take leases; outcomes are fenced by the lease token. The stores:
``sqlite_store.py`` (the embedded default: WAL, ``synchronous=FULL``; schema in
``sqlite_schema.py``, the group-commit writer in ``sqlite_writer.py``),
``postgres_store.py`` with ``postgres_schema.py`` (versioned migrations),
``postgres_connection.py`` (pool, health) and ``postgres_writer.py`` for several nodes
sharing one queue, and ``memory_store.py`` for tests. ``codec.py`` is the one stored form of
envelope values, shared by every store and ``queue export``; ``history.py`` keeps the
per-message event history; ``health.py`` watches the store and says when it cannot
recover. *When* and *how* to deliver is ``delivery/``'s business.

May import (DESIGN.md "Rooms"): ``core`` only (and ``observability``, ``config`` model types).

Rules kept everywhere:

* 250 means durable: ``commit`` returns only once the message and its delivery records
  are on stable storage (fsync); a failure before that leaves nothing visible.
* Storage is not scheduling: a store keeps the ``next_try`` it is given and never decides
  one; when to retry is a pure function outside this room.
* One contract test suite runs against every store, plus a differential test against the
  in-memory store: a store that passes it may replace another.
"""
