"""The inbound policy pipeline: every decision about a session or a message.

Design note
-----------
The session (``inbound/session.py``) speaks SMTP and moves bytes; it decides
nothing. At each *phase* it asks one ``Pipeline`` (``pipeline.py``, the contract as a
numbered transaction) and acts on the answer:

    connect (after the greet pause) → helo → mail → rcpt (each) → data → end of data
                                                      (header section + body reader)

A *check* is one file here implementing the ``Check`` protocol (``base.py``) for the phases it
needs (``BaseCheck`` answers "no objection" for the rest) and returning a
``Decision`` value (``decision.py``): continue, accept (this check is done with the
transaction), reject with a 4xx/5xx ``Reply`` carrying an enhanced status code (and
optionally disconnect), discard, quarantine, plus *changes*: add/change/insert/delete
header fields, replace the header section or the body, change the sender, add or
delete recipients, route a recipient to its final addresses. A decision also says in
one line what the check *saw*: that line, the action and the reply sent become a
``TraceStep`` (``postillon explain`` tells the story of a session or message from
them; ``trace.py`` keeps them in the queue store, bounded and expiring).

What a check sees (``context.py``): ``ClientFacts`` (IP, forward-confirmed reverse
name, HELO, TLS, AUTH identity, trusted network, pregreet bytes), the
``TransactionContext`` (sender, queue id, recipients so far), one ``RecipientFacts``
at rcpt, and a ``MessageView`` at end of data (header section as changed so far,
whole-message bytes under a bound, body chunks from the spool). A check keeps its
per-session state in ``SessionContext.state[name]`` (a milter's connection) and is
told ``reset`` (transaction abandoned) and ``close`` (session over). State shared
across sessions and nodes (greylisting, port-25 rate limits) lives in the queue store
(``PipelineParts.store``), never in the check object alone.

Composition (``pipeline.build_pipeline``): each check module has
``build(kind, parts) -> Check | None`` and decides from the config in ``parts``
(``parts.py``) whether it runs on that listener kind; ``pipeline.factories()`` lists
them in the order they are asked. Semantics kept everywhere: the first reject wins
and stops the phase; a check that raises is a ``451 4.3.0`` (logged, never echoed);
checks never write the queue (``intake`` does, with the ``MessageVerdict``).

Files: ``pipeline.py`` (the pipeline and composition), ``base.py`` (the ``Check``
protocol, ``BaseCheck``), ``decision.py`` (values), ``context.py`` (what checks
see), ``header_edit.py`` (applying header changes),
``parts.py`` (what checks are built from), ``trace.py`` (the explain trace).
The checks: ``relay_check.py`` (``relay.py``'s RelayPolicy: who may send where),
``submission_check.py`` (``sender_policy.py``, ``rate_limit.py``: RFC 6409
submission), ``authentication_check.py`` (SPF/DKIM/DMARC/ARC below), port-25
protection: ``pregreet.py``, ``dnsbl.py``, ``reverse_dns.py``, ``helo_check.py``.
``milter_check.py``: every ``[[milter]]`` in order (rspamd, OpenDKIM, clamav-milter), over
``milter_driver.py`` (the asyncio adapter of ``protocol/milter.py``, timeouts and
failures; its socket an asyncio Protocol in ``milter_socket.py``) with
``milter_macros.py`` (what a milter is told); docs/milter.md.
protection: ``pregreet.py``, ``dnsbl.py``, ``reverse_dns.py``, ``helo_check.py``,
``smtp_rate_limit.py`` (messages and recipients per client network and sender domain per
window) and ``greylist.py``, both with their state in the queue store (shared by every
node); ``policy_service.py`` (Postfix policy delegation: postgrey, policyd-spf, ...).

Inbound authentication on MX listeners, run at end of data before the commit
(``authentication.py`` orchestrates; ``auth_policy.py`` decides):
``spf_check.py`` (pyspf), ``dkim_check.py`` (postillon's own ``dkimcore``, in a
helper process when there is one: ``dkimcore/remote.py``), ``dmarc_check.py``
(RFC 7489 on top of those), ``arc_check.py`` (verify and seal with dkimpy, the
one user of ``dkim_speedups.py``, which is why dkimpy is pinned),
``authresults.py`` (the RFC 8601 header), ``blocking_dns.py`` (the libraries'
lookups, through postillon's resolver).
"""
