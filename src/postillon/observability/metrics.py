"""The metrics registry: every Prometheus metric postillon exports, in one place.

Design note
-----------
One ``Metrics`` object per process, built by the composition root and handed
to the components that count things (no module-level registry: tests and
embedders may build several). Each instance owns its own
``CollectorRegistry``; the admin server renders it at ``/metrics``.

Cheapness matters on the accept path (benchmarked against Postfix): callers
resolve labelled children once (per listener, per session) and then only
call ``inc()``/``observe()``. Label values come from small closed sets
(listener names from the config, transport kinds, TLS versions, DNS record
types, status-code classes), never from queue ids or addresses, so the
number of time series stays bounded whatever clients send.

Queue size by state is not counted incrementally: it is read from the store
(``count_by_state``) when scraped, at most once per ``QUEUE_REFRESH`` seconds
(``QueueSizeCollector``), so several scrapers cost one query.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from postillon.core.reply import Reply

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Time from arrival to a final outcome: seconds for local mail, up to the
# queue lifetime (days) for mail that waits for a remote host.
END_TO_END_BUCKETS = (
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    300,
    900,
    3600,
    4 * 3600,
    86400,
    5 * 86400,
)
# One delivery attempt: a local write, or one SMTP transaction with a remote host.
ATTEMPT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
DNS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

# How long a queue count read from the store is reused for further scrapes.
QUEUE_REFRESH = 1.0

# Why a message or recipient was refused; the closed set of ``reason`` labels
# of ``postillon_messages_rejected_total``.
REJECT_REASONS = (
    "relay_denied",  # RCPT to a domain we do not relay for (5.7.1)
    "unknown_recipient",  # RCPT to a local mailbox that does not exist (5.1.1)
    "recipient",  # other RCPT refusals
    "rate_limit",  # submission and port-25 rate limits (4.7.1 / 4.5.3)
    "greylist",  # greylisted: the first attempt of an unknown triplet (450 4.7.1)
    "policy_service",  # a [[policy_service]] answer, or its default_action
    "sender_policy",  # submission: MAIL FROM / From: not owned by the user
    "data",  # the body was refused while it arrived (size, bare LF, ...)
    "loop",  # too many Received: headers (5.4.6)
    "authentication",  # SPF/DKIM/DMARC refused it (5.7.x), or DNS failed (451 4.7.x)
    "local_error",  # the queue could not take the message (4.3.x)
    "connection_limit",  # too many connections (421 4.7.0 at connect)
)


def reject_reason_for_recipient(reply: Reply) -> str:
    """The ``reason`` label of an RCPT refusal, from its enhanced status code."""
    status = reply.status or ""
    if status.endswith(".7.1"):
        return "relay_denied"
    if status.endswith(".1.1"):
        return "unknown_recipient"
    return "recipient"


def reject_reason_for_commit(reply: Reply) -> str:
    """The ``reason`` label of a refusal at end of data (intake's reply)."""
    if (reply.status or "").endswith(".4.6"):
        return "loop"
    if reply.code >= 500:
        return "data"
    return "local_error"


def outcome_reason(reply: Reply) -> str:
    """A bounded ``reason`` label for a deferral or a bounce: the enhanced
    status code's class and subject (RFC 3463: ``4.4`` network/routing,
    ``5.1`` addressing, ``5.7`` security/policy, ...), or the basic code's
    class when the reply has no enhanced code."""
    status = reply.status
    if status:
        klass, _, rest = status.partition(".")
        subject = rest.partition(".")[0]
        if klass in ("2", "4", "5") and subject.isdigit() and len(subject) <= 2:
            return f"{klass}.{subject}"
    return f"{reply.code // 100}xx" if 200 <= reply.code < 600 else "other"


class DnsLookup(Protocol):
    """What a DNS lookup event carries (``dns.resolver.LookupEvent``)."""

    @property
    def rdtype(self) -> str: ...
    @property
    def result(self) -> str: ...
    @property
    def seconds(self) -> float: ...
    @property
    def cached(self) -> bool: ...


class QueueSizeCollector(Collector):
    """``postillon_queue_records{state}``: delivery records per state, read
    from the store on scrape (``refresh``), reused for ``QUEUE_REFRESH`` s."""

    def __init__(self, count: Callable[[], Awaitable[Mapping[str, int]]] | None = None) -> None:
        self._count = count
        self._values: Mapping[str, int] = {}
        self._read_at = float("-inf")

    def attach(self, count: Callable[[], Awaitable[Mapping[str, int]]]) -> None:
        """Point the collector at the running store (the composition root does)."""
        self._count = count
        self._read_at = float("-inf")

    async def refresh(self) -> None:
        if self._count is None or time.monotonic() - self._read_at < QUEUE_REFRESH:
            return
        self._values = dict(await self._count())
        self._read_at = time.monotonic()

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "postillon_queue_records",
            "Delivery records in the queue by state (one per recipient of each queued message)",
            labels=["state"],
        )
        for state, count in sorted(self._values.items()):
            family.add_metric([state], count)
        yield family


class AcmeStatusView(Protocol):
    """``certs.storage.AcmeStatus``, as far as the metrics read it."""

    not_after: float | None
    last_success: float | None
    failures: int


class Metrics:
    """All of postillon's metrics, registered in ``self.registry``."""

    def __init__(self) -> None:
        # No ``*_created`` series: they double the output and Prometheus does
        # not need them for rates. (A process-wide switch of the library.)
        disable_created_metrics()  # type: ignore[no-untyped-call]
        registry = self.registry = CollectorRegistry(auto_describe=True)
        # -- inbound -------------------------------------------------------------------
        self.received = Counter(
            "postillon_messages_received",
            "Messages accepted into the queue (a 250 after end of data), by listener "
            "(or source: sendmail, bounce)",
            ["listener"],
            registry=registry,
        )
        # DKIM signatures made at intake (signing/), by algorithm (rsa, ed25519).
        self.dkim_signatures = Counter(
            "postillon_dkim_signatures",
            "DKIM signatures added to accepted messages, by algorithm (rsa, ed25519)",
            ["algorithm"],
            registry=registry,
        )
        self.rejected = Counter(
            "postillon_messages_rejected",
            "Refusals: recipients refused at RCPT, messages refused at or after DATA, "
            "and connections refused, by listener and reason",
            ["listener", "reason"],
            registry=registry,
        )
        self.connections = Counter(
            "postillon_connections",
            "Connections opened, by direction (in: per listener; out: listener is empty)",
            ["direction", "listener"],
            registry=registry,
        )
        self.connections_active = Gauge(
            "postillon_connections_active",
            "Connections open now, by direction (in: per listener; out: listener is empty)",
            ["direction", "listener"],
            registry=registry,
        )
        self.tls = Counter(
            "postillon_tls_sessions",
            "TLS sessions established (STARTTLS or implicit TLS), by direction and version",
            ["direction", "version"],
            registry=registry,
        )
        self.outbound_tls = Counter(
            "postillon_outbound_tls_sessions",
            "Outbound SMTP sessions by TLS policy (none, opportunistic, encrypt, verify, "
            "fingerprint, dane) and result (verified, pinned, dane-ta, dane-ee, tlsa-unusable, "
            "unverified, plaintext, starttls-not-supported, starttls-refused, "
            "handshake-failed, not-verified, fingerprint-mismatch, tlsa-mismatch, "
            "no-certificate, config-error; hosts refused before connecting: dnssec-bogus, "
            "dane-lookup-failed, dane-unavailable)",
            ["policy", "result"],
            registry=registry,
        )
        self.auth_failures = Counter(
            "postillon_auth_failures",
            "Failed SMTP AUTH attempts, by listener and mechanism",
            ["listener", "mechanism"],
            registry=registry,
        )
        # -- queue and delivery --------------------------------------------------------
        self.delivered = Counter(
            "postillon_messages_delivered",
            "Recipients delivered, by transport (maildir, smtp, lmtp, discard)",
            ["transport"],
            registry=registry,
        )
        self.deferred = Counter(
            "postillon_messages_deferred",
            "Delivery attempts that failed temporarily, by transport and reason "
            "(enhanced status class.subject, e.g. 4.4)",
            ["transport", "reason"],
            registry=registry,
        )
        self.bounced = Counter(
            "postillon_messages_bounced",
            "Recipients failed permanently or expired, by transport and reason "
            "(enhanced status class.subject, or expired)",
            ["transport", "reason"],
            registry=registry,
        )
        self.delivery_seconds = Histogram(
            "postillon_delivery_seconds",
            "Time from arrival to the final outcome of a recipient, by outcome",
            ["outcome"],
            buckets=END_TO_END_BUCKETS,
            registry=registry,
        )
        self.attempt_seconds = Histogram(
            "postillon_delivery_attempt_seconds",
            "Duration of one delivery attempt (one transport call), by transport",
            ["transport"],
            buckets=ATTEMPT_BUCKETS,
            registry=registry,
        )
        self.queue = QueueSizeCollector()
        registry.register(self.queue)
        # -- DNS -----------------------------------------------------------------------
        self.dns_seconds = Histogram(
            "postillon_dns_lookup_seconds",
            "DNS lookups sent to the network, by record type and result",
            ["rdtype", "result"],
            buckets=DNS_BUCKETS,
            registry=registry,
        )
        self.dns_cached = Counter(
            "postillon_dns_cache_hits",
            "DNS lookups answered from the cache (or joined to a lookup in flight)",
            ["rdtype"],
            registry=registry,
        )
        # -- process -------------------------------------------------------------------
        self.helper_requests = Counter(
            "postillon_helper_requests",
            "Work sent to the helper processes (kind: verify, sign), by who did it: "
            "helper, or server (no helper answered: dead, stuck, or lacking a key)",
            ["kind", "done_by"],
            registry=registry,
        )
        self.reloads = Counter(
            "postillon_config_reloads",
            "Configuration reloads (SIGHUP, postillon reload), by result (ok, refused)",
            ["result"],
            registry=registry,
        )
        # -- ACME certificates ([tls] acme) --------------------------------------------
        self.certificate_expiry = Gauge(
            "postillon_tls_certificate_expiry_timestamp_seconds",
            "When the ACME certificate the listeners present expires (Unix time)",
            registry=registry,
        )
        self.acme_failures = Gauge(
            "postillon_acme_renewal_failures",
            "ACME attempts failed in a row (0: the last one succeeded); the old certificate "
            "stays in use meanwhile",
            registry=registry,
        )
        self.acme_last_success = Gauge(
            "postillon_acme_last_success_timestamp_seconds",
            "When the last ACME certificate was obtained by this process (Unix time)",
            registry=registry,
        )
        self.info = Gauge(
            "postillon_info",
            "Always 1; the version is a label",
            ["version"],
            registry=registry,
        )
        from postillon import __version__

        self.info.labels(__version__).set(1)

    def acme_status(self, status: AcmeStatusView) -> None:
        """A ``CertificateManager(on_status=...)`` callback."""
        if status.not_after is not None:
            self.certificate_expiry.set(status.not_after)
        if status.last_success is not None:
            self.acme_last_success.set(status.last_success)
        self.acme_failures.set(status.failures)

    def dns_observer(self) -> Callable[[DnsLookup], None]:
        """A ``DnsResolver(on_lookup=...)`` callback recording lookups."""
        seconds, cached = self.dns_seconds, self.dns_cached

        def observe(event: DnsLookup) -> None:
            if event.cached:
                cached.labels(event.rdtype).inc()
            else:
                seconds.labels(event.rdtype, event.result).observe(event.seconds)

        return observe

    def helper_observer(self) -> Callable[[str, bool], None]:
        """A ``HelperPool(on_answer=...)`` callback: (kind, answered by a helper)."""
        requests = self.helper_requests
        children: dict[tuple[str, bool], Counter] = {}

        def observe(kind: str, answered: bool) -> None:
            child = children.get((kind, answered))
            if child is None:
                child = children[(kind, answered)] = requests.labels(
                    kind, "helper" if answered else "server"
                )
            child.inc()

        return observe

    async def render(self) -> bytes:
        """The Prometheus text exposition, with the queue count freshly read."""
        await self.queue.refresh()
        return generate_latest(self.registry)


class ListenerMetrics:
    """One listener's children of the inbound metrics, resolved once, so a
    session only calls ``inc()`` (the accept path is benchmarked)."""

    def __init__(self, metrics: Metrics, listener: str) -> None:
        self._metrics = metrics
        self.listener = listener
        self.connections = metrics.connections.labels("in", listener)
        self.active = metrics.connections_active.labels("in", listener)
        self._rejected = {
            reason: metrics.rejected.labels(listener, reason) for reason in REJECT_REASONS
        }

    def rejected(self, reason: str) -> None:
        child = self._rejected.get(reason)
        if child is None:  # not one of REJECT_REASONS: still counted, never unbounded
            child = self._rejected["recipient"]
        child.inc()

    def tls(self, version: str) -> None:
        self._metrics.tls.labels("in", version or "unknown").inc()

    def auth_failed(self, mechanism: str) -> None:
        self._metrics.auth_failures.labels(self.listener, mechanism).inc()
