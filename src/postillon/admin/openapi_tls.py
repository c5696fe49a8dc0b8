"""The OpenAPI schemas of the admin API's TLS views (``/api/tls``, the per-recipient
TLS of the message view): split from ``openapi.py`` to keep each file short."""

from __future__ import annotations

from typing import Any

__all__ = ["NULLABLE_STR", "TLS_SCHEMAS", "ref"]

NULLABLE_STR: dict[str, Any] = {"type": ["string", "null"]}


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


TLS_SCHEMAS: dict[str, Any] = {
    "RecipientTls": {
        "type": "object",
        "required": ["policy", "result", "verified"],
        "properties": {
            "at": {"type": "string", "description": "UTC, ISO 8601"},
            "event": {"type": "string", "description": "delivered, deferred, bounced or expired"},
            "mx": {**NULLABLE_STR, "description": "the last host tried"},
            "policy": {
                **NULLABLE_STR,
                "description": "dane, mta-sts, mta-sts-testing, verify, fingerprint, "
                "encrypt, opportunistic or none",
            },
            "result": {**NULLABLE_STR, "description": "e.g. verified, dane-ee, plaintext"},
            "verified": {"type": "boolean", "description": "the server proved its identity"},
            "version": {**NULLABLE_STR, "description": "e.g. TLSv1.3; null without TLS"},
            "cipher": NULLABLE_STR,
        },
    },
    "TlsDomain": {
        "type": "object",
        "required": ["domain", "sessions", "successful", "failed", "results", "mta_sts"],
        "properties": {
            "domain": {"type": "string", "description": "the policy domain (recipient domain)"},
            "sessions": {"type": "integer", "description": "outbound sessions counted"},
            "successful": {"type": "integer"},
            "failed": {"type": "integer"},
            "policy_types": {
                "type": "array",
                "items": {"type": "string"},
                "description": "RFC 8460 policy types seen: tlsa, sts, no-policy-found",
            },
            "results": {
                "type": "object",
                "additionalProperties": {"type": "integer"},
                "description": "sessions by RFC 8460 result type (success, "
                "validation-failure, sts-policy-fetch-error, ...)",
            },
            "failures": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "result": {"type": "string"},
                        "mx_host": {"type": "string"},
                        "receiving_ip": {"type": "string"},
                        "reason": {"type": "string"},
                        "count": {"type": "integer"},
                    },
                },
            },
            "mta_sts": {
                "description": "the cached MTA-STS policy (null: none cached)",
                "anyOf": [
                    {"type": "null"},
                    {
                        "type": "object",
                        "properties": {
                            "mode": {"type": "string"},
                            "mx": {"type": "array", "items": {"type": "string"}},
                            "max_age": {"type": "integer"},
                            "policy_id": {"type": "string"},
                            "fetched_at": {"type": "string"},
                            "expires_at": {"type": "string"},
                            "checked_at": NULLABLE_STR,
                            "fresh": {"type": "boolean"},
                            "last_error": NULLABLE_STR,
                        },
                    },
                ],
            },
        },
    },
    "TlsOverview": {
        "type": "object",
        "required": ["counting", "days", "domains"],
        "properties": {
            "counting": {
                "type": "boolean",
                "description": "sessions are counted ([tls_reports] enabled = true)",
            },
            "days": {"type": "array", "items": {"type": "string"}, "description": "UTC days"},
            "domains": {"type": "array", "items": ref("TlsDomain")},
        },
    },
}
