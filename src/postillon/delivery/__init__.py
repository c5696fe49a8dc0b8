"""Delivery: from a due queue record to an outcome recorded in the store.

Design note (two minutes)
-------------------------
The queue (``queue/``) keeps durable state and makes no decisions; this room
decides *when* to try (``retry.py``), *what* an outcome changes
(``outcomes.py``) and *who* delivers (``runner.py`` through the contract in
``transport.py``). DESIGN principle 5, "storage is not scheduling".

Where things live:

* ``transport.py`` - the contract every transport implements: ``DeliveryJob``
  (the message, its records of one route, the body as an async iterator) and
  the ``Transport`` protocol (one outcome per record, never an exception for a
  delivery problem); grouping records by route. ``outbound/`` and ``local/``
  import this module only, never the runner.
* ``retry.py`` - the retry curve: exponential backoff with jitter, the
  message's lifetime. Pure.
* ``outcomes.py`` - ``plan_outcomes``: record + outcome + now + retry policy ->
  the store update, the mail log events, the metrics, the notices to queue.
  Pure, and tested by a table of cases.
* ``runner.py`` - the asyncio part: claims due records with leases (a bounded
  active set), hands each route group to its transport, applies the plan
  (notices first, then the fenced updates), hands leases back on shutdown and
  takes over the leases of dead processes and nodes.

Rules kept everywhere:

* May import ``core``, the ``queue`` store protocol, ``routing``, ``dsn``,
  ``observability`` and ``config`` model types; never ``intake`` (the
  recent-message cache and intake's ``submit`` are injected as protocols),
  ``inbound``, ``outbound`` or ``local``.
* Outcomes are values (DESIGN principle 6); an unknown error is temporary.
* Every store write of an outcome carries the lease token (fencing): a runner
  whose lease was taken over cannot overwrite the newer result.
* Nothing accepted is lost: a notice is queued before the outcome it reports
  is recorded (a crash gives a duplicate notice, never a lost one).
"""
