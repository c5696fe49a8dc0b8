"""The admin HTTP server: JSON API, web page (and, mounted by observability, metrics).

Design note
-----------
The server is an aiohttp application running in the MTA's own process and
event loop, built by ``server.build_app`` from an ``AdminContext`` (the store,
intake, listeners and clock the composition root already has). It is off
unless ``[admin] listen`` is set.

Every route except ``/healthz`` (and any path added to the public set, such
as ``/metrics``) needs ``Authorization: Bearer <token>``. The token comes from
``postillon admin token``; only its SHA-256 is stored, in
``<data_dir>/admin-token.json``. The token has 256 bits of entropy, so a
fast hash is enough (nobody brute-forces 2**256), and the file is re-read when
it changes, so a new token takes effect without a restart.

Queue operations (summary, listing, retry, hold, release, delete, bounce,
history) live in ``queue_ops``: the API and ``postillon queue ...`` call the
same functions, so they cannot drift apart.
"""
