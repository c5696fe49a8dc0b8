"""The OpenAPI 3 description of the admin API (served at ``/api/openapi.json``).

Written by hand, beside the handlers in ``api.py``; the schemathesis test
fuzzes the running server against it, so the two cannot drift silently.
"""

from __future__ import annotations

from typing import Any

from postillon import __version__
from postillon.admin.openapi_tls import NULLABLE_STR, TLS_SCHEMAS, ref
from postillon.admin.queue_ops import ACTIONS
from postillon.queue.store import DeliveryState

_STATES = [s.value for s in DeliveryState]


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERROR = _json(ref("Error"), "Error")
_UNAUTHORIZED = _json(ref("Error"), "Missing or wrong token")

_QUEUE_ID = {
    "name": "queue_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[0-9A-HJKMNP-TV-Z]{17}$"},
    "description": "Queue id as shown in the mail log",
}


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "string"}},
    },
    "Recipient": {
        "type": "object",
        "required": ["recipient", "state", "attempts"],
        "properties": {
            "recipient": {"type": "string"},
            "original_recipient": NULLABLE_STR,
            "state": {"type": "string", "enum": _STATES},
            "attempts": {"type": "integer", "minimum": 0},
            "next_try": {**NULLABLE_STR, "description": "UTC, ISO 8601"},
            "last_reply": {**NULLABLE_STR, "description": "e.g. 451 4.4.1 Connection refused"},
            "last_reply_code": {"type": ["integer", "null"]},
            "lease_owner": NULLABLE_STR,
            "tls": {
                "anyOf": [ref("RecipientTls"), {"type": "null"}],
                "description": "message detail only: the TLS of the last delivery attempt "
                "(null: none yet, or not over SMTP)",
            },
        },
    },
    **TLS_SCHEMAS,  # openapi_tls.py
    "Message": {
        "type": "object",
        "required": ["queue_id", "sender", "size", "received_at", "state", "recipients"],
        "properties": {
            "queue_id": {"type": "string"},
            "sender": {"type": "string", "description": "empty for the null sender <>"},
            "size": {"type": "integer"},
            "received_at": {"type": "string", "description": "UTC, ISO 8601"},
            "age_seconds": {"type": "number"},
            "client": {"type": "string"},
            "source": {"type": "string"},
            "state": {"type": "string", "enum": _STATES},
            "recipients": {"type": "array", "items": ref("Recipient")},
        },
    },
    "MessageDetail": {
        "allOf": [
            ref("Message"),
            {
                "type": "object",
                "properties": {
                    "subject": NULLABLE_STR,
                    "mail_params": {"type": "object"},
                    "headers": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "name": {"type": "string"},
                                "value": {"type": "string"},
                            },
                        },
                    },
                },
            },
        ]
    },
    "Page": {
        "type": "object",
        "required": ["total", "offset", "limit", "messages"],
        "properties": {
            "total": {"type": "integer"},
            "offset": {"type": "integer"},
            "limit": {"type": "integer"},
            "messages": {"type": "array", "items": ref("Message")},
        },
    },
    "Event": {
        "type": "object",
        "required": ["at", "event", "fields"],
        "properties": {
            "at": {"type": "string"},
            "ts": {"type": "number"},
            "event": {
                "type": "string",
                "description": "received, deferred, delivered, bounced, expired, bounce, "
                "error or operator",
            },
            "fields": {"type": "object"},
        },
    },
    "Step": {
        "type": "object",
        "required": ["session_id", "at", "phase", "check", "action"],
        "properties": {
            "session_id": {"type": "string"},
            "queue_id": {"type": "string", "description": "empty before the transaction"},
            "at": {"type": "number", "description": "Unix time"},
            "client_ip": {"type": "string"},
            "phase": {"type": "string"},
            "check": {"type": "string", "description": "the check, or session"},
            "action": {"type": "string"},
            "saw": {"type": "string", "description": "what the check looked at"},
            "reply": {"type": "string", "description": "the reply sent because of it"},
        },
    },
    "Explain": {
        "type": "object",
        "required": ["queue_id", "steps"],
        "properties": {
            "queue_id": {"type": "string"},
            "steps": {"type": "array", "items": ref("Step")},
        },
    },
    "Sessions": {
        "type": "object",
        "required": ["sessions"],
        "properties": {
            "sessions": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["session_id", "steps"],
                    "properties": {
                        "session_id": {"type": "string"},
                        "client_ip": {"type": "string"},
                        "started_at": {"type": "string"},
                        "rejected": {"type": "boolean"},
                        "outcome": {"type": "string"},
                        "queue_ids": {"type": "array", "items": {"type": "string"}},
                        "steps": {"type": "array", "items": ref("Step")},
                    },
                },
            }
        },
    },
    "Events": {
        "type": "object",
        "required": ["queue_id", "in_queue", "events"],
        "properties": {
            "queue_id": {"type": "string"},
            "in_queue": {"type": "boolean"},
            "events": {"type": "array", "items": ref("Event")},
        },
    },
    "Summary": {
        "type": "object",
        "required": ["messages", "queued_recipients", "by_state", "by_domain"],
        "properties": {
            "messages": {"type": "integer"},
            "queued_recipients": {"type": "integer"},
            "by_state": {"type": "object", "additionalProperties": {"type": "integer"}},
            "oldest_age_seconds": {"type": ["number", "null"]},
            "oldest_queue_id": NULLABLE_STR,
            "age_buckets_minutes": {"type": "array", "items": {"type": "integer"}},
            "by_domain": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "domain": {"type": "string"},
                        "total": {"type": "integer"},
                        "by_state": {"type": "object"},
                        "by_age": {"type": "array", "items": {"type": "integer"}},
                        "oldest_age_seconds": {"type": ["number", "null"]},
                    },
                },
            },
        },
    },
    "Status": {
        "type": "object",
        "required": ["version", "hostname", "uptime_seconds", "listeners", "connections"],
        "properties": {
            "version": {"type": "string"},
            "hostname": {"type": "string"},
            "started_at": {"type": "string"},
            "uptime_seconds": {"type": "number"},
            "listeners": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "kind": {"type": "string"},
                        "address": {"type": "string"},
                        "sessions": {"type": "integer"},
                    },
                },
            },
            "connections": {"type": "object"},
            "queue": {"type": "object"},
            "certificate": {
                "type": ["object", "null"],
                "description": "The ACME certificate ([tls] acme): state (none, ok, "
                "renewing, failing), names, not_after, issuer, last_error, failures",
            },
        },
    },
    "ActionResult": {
        "type": "object",
        "required": ["action", "recipients"],
        "properties": {
            "queue_id": {"type": "string"},
            "action": {"type": "string"},
            "recipients": {"type": "integer", "description": "recipients affected"},
        },
    },
    "Suspension": {
        "type": "object",
        "required": ["destination", "until", "reason"],
        "properties": {
            "destination": {"type": "string", "description": "a domain, or mx:.suffix"},
            "since": {"type": "string"},
            "until": {"type": "string"},
            "remaining_seconds": {"type": "integer"},
            "reason": {"type": "string"},
            "level": {"type": "integer", "description": "suspensions in a row (0: operator)"},
            "by_operator": {"type": "boolean"},
        },
    },
    "ReloadResult": {
        "type": "object",
        "required": ["applied"],
        "properties": {
            "applied": {"type": "boolean"},
            "error": NULLABLE_STR,
            "restart_needed": {"type": "array", "items": {"type": "string"}},
        },
    },
    "Activity": {
        "type": "object",
        "required": ["buckets", "series", "bucket_seconds"],
        "properties": {
            "start": {"type": "string"},
            "bucket_seconds": {"type": "number"},
            "buckets": {"type": "array", "items": {"type": "string"}},
            "series": {
                "type": "object",
                "additionalProperties": {"type": "array", "items": {"type": "integer"}},
            },
        },
    },
}


def _get(
    summary: str,
    ok: dict[str, Any],
    *,
    params: list[Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    responses: dict[str, Any] = {"200": ok, "400": _ERROR, "401": _UNAUTHORIZED}
    responses.update(extra or {})
    return {"get": {"summary": summary, "parameters": params or [], "responses": responses}}


_DAYS = _query(
    "days",
    {"type": "integer", "minimum": 1, "maximum": 14},
    "UTC days counted, today first (default 2: today and yesterday)",
)


def spec() -> dict[str, Any]:
    not_found = {"404": _ERROR}
    age = {"type": "number", "minimum": 0, "maximum": 1e9}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "postillon admin API",
            "version": __version__,
            "description": "Queue inspection and actions, message history, server status. "
            "Every path but /healthz needs `Authorization: Bearer <token>` "
            "(make one with `postillon admin token`).",
        },
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {"token": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"token": []}],
        "paths": {
            "/healthz": {
                "get": {
                    "summary": "Liveness (no token needed)",
                    "security": [],
                    "responses": {
                        "200": _json({"type": "object"}, "The server runs"),
                        "503": _json(
                            {"type": "object"},
                            "The server runs but its queue store cannot take mail (a shared"
                            " queue's database unreachable, the writer gone): `reason` says why",
                        ),
                    },
                }
            },
            "/api/status": _get(
                "Server status: listeners, connections, version, uptime",
                _json(ref("Status"), "Status"),
            ),
            "/api/queue/summary": _get(
                "Queue shape: counts by state, by destination domain and age (qshape)",
                _json(ref("Summary"), "Summary"),
            ),
            "/api/queue/messages": _get(
                "Queued messages, filtered and paged (arrival order)",
                _json(ref("Page"), "One page of messages"),
                params=[
                    _query(
                        "state", {"type": "string", "enum": _STATES}, "a recipient in this state"
                    ),
                    _query(
                        "sender",
                        {"type": "string", "maxLength": 320},
                        "substring of the sender; <> for the null sender",
                    ),
                    _query(
                        "recipient",
                        {"type": "string", "maxLength": 320},
                        "substring of a recipient",
                    ),
                    _query(
                        "domain", {"type": "string", "maxLength": 320}, "a recipient in this domain"
                    ),
                    _query("min_age", age, "received at least this many seconds ago"),
                    _query("max_age", age, "received at most this many seconds ago"),
                    _query(
                        "offset",
                        {"type": "integer", "minimum": 0, "maximum": 10_000_000},
                        "skip this many",
                    ),
                    _query(
                        "limit",
                        {"type": "integer", "minimum": 1, "maximum": 500},
                        "page size (default 50)",
                    ),
                ],
            ),
            "/api/queue/messages/{queue_id}": _get(
                "One message: envelope, recipients, headers",
                _json(ref("MessageDetail"), "The message"),
                params=[_QUEUE_ID],
                extra=not_found,
            ),
            "/api/queue/messages/{queue_id}/events": _get(
                "The message's history: received, each attempt with the remote reply, actions",
                _json(ref("Events"), "History, oldest first"),
                params=[
                    _QUEUE_ID,
                    _query(
                        "limit",
                        {"type": "integer", "minimum": 1, "maximum": 5000},
                        "at most this many (the latest)",
                    ),
                ],
                extra=not_found,
            ),
            "/api/queue/messages/{queue_id}/explain": _get(
                "Every check's decision on the message and its SMTP session (postillon explain)",
                _json(ref("Explain"), "The decisions, in order"),
                params=[_QUEUE_ID],
                extra=not_found,
            ),
            "/api/sessions": _get(
                "Recent SMTP sessions with their decisions, by client and time (newest first)",
                _json(ref("Sessions"), "Sessions"),
                params=[
                    _query(
                        "client",
                        {"type": "string", "maxLength": 64, "pattern": "^[0-9a-fA-F.:]*$"},
                        "the client's IP address (empty: any)",
                    ),
                    _query(
                        "hours", {"type": "number", "minimum": 0.1, "maximum": 336}, "how far back"
                    ),
                    _query("rejected", {"type": "boolean"}, "only sessions with a refusal"),
                    _query("limit", {"type": "integer", "minimum": 1, "maximum": 500}, "at most"),
                ],
            ),
            "/api/queue/messages/{queue_id}/raw": _get(
                "The stored message as delivered (download)",
                {
                    "description": "The message",
                    "content": {
                        "message/rfc822": {"schema": {"type": "string", "format": "binary"}}
                    },
                },
                params=[_QUEUE_ID],
                extra=not_found,
            ),
            "/api/queue/messages/{queue_id}/{action}": {
                "post": {
                    "summary": "Act on a message: retry now, hold, release, delete, or bounce "
                    "(fail the remaining recipients now, with a notice to the sender)",
                    "parameters": [
                        _QUEUE_ID,
                        {
                            "name": "action",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string", "enum": list(ACTIONS)},
                        },
                    ],
                    "responses": {
                        "200": _json(ref("ActionResult"), "Done"),
                        "400": _ERROR,
                        "401": _UNAUTHORIZED,
                        "404": _ERROR,
                        "409": _json(ref("Error"), "Nothing to do (e.g. retry of a held message)"),
                    },
                }
            },
            "/api/queue/flush": {
                "post": {
                    "summary": "Make every deferred recipient due now",
                    "responses": {"200": _json(ref("ActionResult"), "Done"), "401": _UNAUTHORIZED},
                }
            },
            "/api/queue/suspensions": {
                **_get(
                    "Destinations whose deliveries are suspended (docs/shaping.md)",
                    _json({"type": "array", "items": ref("Suspension")}, "Running suspensions"),
                ),
                "post": {
                    "summary": "Suspend a destination: JSON body destination, seconds "
                    "(default 3600), reason",
                    "responses": {
                        "200": _json(ref("Suspension"), "Suspended"),
                        "400": _ERROR,
                        "401": _UNAUTHORIZED,
                    },
                },
            },
            "/api/queue/suspensions/{destination}": {
                "delete": {
                    "summary": "Resume a destination; its deferred mail is due now",
                    "parameters": [
                        {
                            "name": "destination",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        }
                    ],
                    "responses": {
                        "200": _json(ref("ActionResult"), "Resumed"),
                        "400": _ERROR,
                        "404": _ERROR,
                        "401": _UNAUTHORIZED,
                    },
                }
            },
            "/api/activity": _get(
                "Messages received, delivered, deferred, bounced per time bucket (dashboard chart)",
                _json(ref("Activity"), "Counts per bucket"),
                params=[
                    _query(
                        "hours",
                        {"type": "number", "minimum": 0.25, "maximum": 336},
                        "how far back (default 6)",
                    ),
                    _query(
                        "bucket_minutes",
                        {"type": "number", "minimum": 1, "maximum": 1440},
                        "bucket width (default 10)",
                    ),
                ],
            ),
            "/api/tls": _get(
                "Outbound TLS per destination domain: sessions by result over the last days "
                "(the TLS report counters) and the cached MTA-STS policy",
                _json(ref("TlsOverview"), "Busiest domain first"),
                params=[_DAYS],
            ),
            "/api/tls/{domain}": _get(
                "Outbound TLS to one destination domain",
                _json(
                    {
                        "allOf": [
                            ref("TlsDomain"),
                            {
                                "type": "object",
                                "properties": {
                                    "counting": {"type": "boolean"},
                                    "days": {"type": "array", "items": {"type": "string"}},
                                },
                            },
                        ]
                    },
                    "The domain",
                ),
                params=[
                    {
                        "name": "domain",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "maxLength": 253},
                    },
                    _DAYS,
                ],
                extra=not_found,
            ),
            "/api/reload": {
                "post": {
                    "summary": "Re-read the configuration, certificates, aliases and accounts "
                    "(as SIGHUP); an invalid new configuration is refused and the old one kept",
                    "responses": {
                        "200": _json(ref("ReloadResult"), "Applied"),
                        "401": _UNAUTHORIZED,
                        "409": _json(ref("ReloadResult"), "Refused; the old configuration stays"),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics (text exposition format)",
                    "responses": {
                        "200": {
                            "description": "Metrics",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        },
                        "401": _UNAUTHORIZED,
                    },
                }
            },
            "/api/openapi.json": _get("This description", _json({"type": "object"}, "OpenAPI 3")),
        },
    }
