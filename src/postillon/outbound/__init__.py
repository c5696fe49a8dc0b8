"""Outbound delivery over SMTP and LMTP.

Design note
-----------
``client_session.SmtpClientSession`` is the thin asyncio adapter around the
sans-IO ``protocol.client.ClientConnection``. ``smtp_transport.SmtpTransport``
is what the queue runner calls: it finds the next hops (a transport-table
host, the smarthost, or the domain's MX hosts in RFC 5321 §5.1 order), tries
each host and each of its addresses until one takes the transaction, reuses
idle connections to the same destination, and bounds concurrency in total and
per destination. Every result comes back as one outcome per recipient
(``Delivered`` / ``TempFail`` / ``PermFail``); nothing is raised across the
boundary. TLS is opportunistic by default (RFC 7435): used when offered, the
certificate's verification result logged but not required. ``tls.py`` holds
the TLS decisions (the client context, the name to verify, whether the
certificate verified), so TLS policy grows there and the driver stays thin.
DANE (RFC 7672, only with ``[dns] trust_ad``): ``dane.py`` is the pure TLSA
matcher (records + the server's DER chain -> a verdict), ``dane_policy.py``
the decision per MX host (``DaneHook``: from the DNSSEC state of the MX,
address and TLSA answers) that the transport consults before connecting and
after STARTTLS.
"""
