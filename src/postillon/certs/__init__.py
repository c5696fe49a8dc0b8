"""Automatic certificates over ACME (RFC 8555): ``[tls] acme = true``.

Design note (two minutes)
-------------------------
``manager.py`` is the asyncio side: at start it loads the certificate kept in
``data_dir/acme`` (or, in a cluster, the newer one in the queue store), obtains one when
there is none or it names the wrong hosts, and renews at two thirds of its lifetime
(``[tls] acme_renew_before``). Each new certificate is handed to the server's ``apply``
callback, which loads it into every TLS context the listeners hold (STARTTLS, 465, the
MTA-STS server, the admin server): handshakes from then on present it, sessions already
up keep theirs. A failed attempt keeps the old certificate, backs off (one minute,
doubling, at most six hours) and shows on /healthz, the admin page and /metrics.

``acme_client.py`` is the protocol, through certbot's ``acme`` library: its calls block
(``requests``), so each attempt runs in a worker thread, never on the event loop.
``challenges.py`` answers the CA: TLS-ALPN-01 (RFC 8737) on the MTA-STS listener (port
443, the same socket as the policy) and HTTP-01 on ``[tls] acme_http_listen`` (port 80).
``storage.py`` keeps the account key and the certificates (mode 0600), and the last
attempt's status for ``postillon tls renew``.

In a cluster (the PostgreSQL store) one node renews at a time: it takes a lease in the
store (``queue/acme_state.py``), and the others load the result from the store.

May import (DESIGN.md "Rooms"): ``queue.store`` (the lease and the shared certificate),
plus what every room may.
"""
