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
``TlsRequirement``; for MX hosts (and ``dane`` rules) the transport asks
``dane_policy.DaneHook`` (only with ``[dns] trust_ad``) what DNSSEC and the
TLSA records say, and for the recipient domain's own MX hosts
``sts_policies.StsPolicies`` (only with ``[outbound] mta_sts``) which MTA-STS
policy applies (cached in the queue store, fetched with ``dns.sts_fetch``,
refreshed in the background), which ``mta_sts.decide`` turns into a
requirement or a refusal per host. ``tls_policy.decide`` applies the
precedence (final rules, mandatory DANE, published DANE, then MTA-STS, then
the default; its module note is the one place it is written). A hop with a
password needs an authenticated result (``for_credentials``).
``requiretls`` (RFC 8689) frames the decision per message: ``TLS-Required:
No`` relaxes the table's requirement to a final opportunistic one before it,
and a REQUIRETLS message raises the decided requirement to an authenticated
one (DANE and MTA-STS enforce already are), demands REQUIRETLS in the server's
EHLO and turns TLS failures of such a message into bounces. After the
handshake ``tls.check_requirement`` judges the server's chain against the
requirement - web PKI (verify, an MTA-STS enforce match), pin or TLSA match
(``dane.py``, the pure RFC 7672 matcher) - and the session goes on only when
it passed. All of it is pure but the lookups; the session and the transport
only apply it. The default stays opportunistic (RFC 7435): used when offered,
the certificate's verification result logged but not required.
"""
