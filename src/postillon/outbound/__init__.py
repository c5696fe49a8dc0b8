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
boundary.

TLS: before each connection ``tls_policy.resolve`` turns the destination, the
MX host and the policy table ([outbound] tls, [[tls_policy]]) into a
``TlsRequirement`` (a hop with a password needs at least ``verify``:
``for_credentials``); after the handshake ``tls.check_requirement`` judges the
server's chain against it, and the session goes on only when it passed.
Both are pure; the session and the transport only apply them. ``dane``
requirements go through ``SmtpTransport.dane`` (the DANE module's hook).
``requiretls`` (RFC 8689) adjusts the resolved requirement per message (raised
for MAIL ... REQUIRETLS, relaxed for ``TLS-Required: No``), demands REQUIRETLS
in the server's EHLO, and turns TLS failures of such a message into bounces.
The default stays opportunistic (RFC 7435): used when offered, the
certificate's verification result logged but not required.
"""
