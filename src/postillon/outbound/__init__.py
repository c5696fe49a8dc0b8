"""Outbound delivery over SMTP and LMTP.

Design note
-----------
``client_session.SmtpClientSession`` is the thin asyncio adapter around the
sans-IO ``protocol.client.ClientConnection``. ``smtp_transport.SmtpTransport``
is what the queue runner calls: it finds the next hops (a transport-table
host, the smarthost, or the domain's MX hosts in RFC 5321 §5.1 order, worked
out by ``mx.py`` with null MX (RFC 7505); a DNS problem is a value there, the
outcome of every recipient of that domain), tries
each host and each of its addresses until one takes the transaction, reuses
idle connections to the same destination, and bounds concurrency in total and
per destination. Every result comes back as one outcome per recipient
(``Delivered`` / ``TempFail`` / ``PermFail``); nothing is raised across the
boundary. TLS is opportunistic by default (RFC 7435): used when offered, the
certificate's verification result logged but not required. ``tls.py`` holds
the TLS decisions (the client context, the name to verify, whether the
certificate verified), so TLS policy grows there and the driver stays thin.

MTA-STS (RFC 8461): ``sts_policies.py`` finds a recipient domain's policy (cached in
the queue store, fetched with ``dns.sts_fetch``, refreshed in the background);
``mta_sts.py`` decides per MX host before connecting and checks the certificate after
STARTTLS; ``smtp_transport.py`` calls the two as one hook and one gate.
"""
