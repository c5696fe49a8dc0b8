"""What a reload may change, and what needs a restart.

A reload (SIGHUP, ``postillon reload``) applies a new configuration to the
running server without closing connections. Some settings are fixed for
the life of the process: the sockets are bound (``listen``), privileges are
dropped (``user``), the queue is open (``data_dir``, the store), and the
admin server is bound (``[admin]``). Those keep their old values; the
reload reports each one that differs, by its config key, so the operator
knows a restart is needed.

The rule is a whitelist: a top-level section not named in ``RELOADABLE``
(including sections added later, e.g. ``[admin]``) needs a restart, and so does
every field of a section in ``PARTLY_RELOADABLE`` that its set does not name.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from postillon.config.model import Config
from postillon.config.tls import RELOADABLE_TLS

# Top-level settings a reload applies.
RELOADABLE = frozenset(
    {
        "hostname",
        "relay",
        "limits",
        "domain",
        "aliases",
        "queue",  # except the fields below
        "log",
        "transport",
        "tls_policy",  # new SMTP transports, as for outbound
        "shaping",  # new SMTP transports with the new rules (suspensions stay in the store)
        "backoff",  # the same
        "submission",
        "shutdown",
        "dns",  # a new resolver and new SMTP transports; deliveries in flight finish
        "outbound",  # on the old ones
        "authentication",  # rebuilt with the policy on reload
        "dkim",  # keys re-read on reload
        "helper_processes",  # extra helpers stop, missing ones start on the next request
        "dnsbl",  # the checks are rebuilt with the policy on reload
        "client_checks",
        "milter",  # rebuilt with the pipeline; sessions in progress keep their connections
        # Port-25 checks: rebuilt with the policy pipeline; their state is in the store.
        "greylist",
        "smtp_rate_limits",
        "policy_service",
    }
)
# [mta_sts] settings a reload applies: the policy served; its socket stays bound.
RELOADABLE_MTA_STS = frozenset({"mode", "max_age", "mx"})
# [queue] settings a reload applies (retry curve and runner limits); every
# other [queue] field chooses or configures the store.
RELOADABLE_QUEUE = frozenset(
    {
        "first_retry",
        "max_retry",
        "lifetime",
        "concurrency",
        "lease",
        "delay_warning",
        "node_timeout",
    }
)

# Sections of which only some fields are reloadable, and those fields.
PARTLY_RELOADABLE: dict[str, frozenset[str]] = {
    "queue": RELOADABLE_QUEUE,
    "mta_sts": RELOADABLE_MTA_STS,
    "tls": RELOADABLE_TLS,
}


def restart_needed(old: Config, new: Config) -> list[str]:
    """Config keys whose new value only takes effect after a restart."""
    keys: list[str] = []
    for name in type(old).model_fields:
        before, after = getattr(old, name), getattr(new, name)
        if before == after:
            continue
        if name in PARTLY_RELOADABLE:
            keys.extend(
                f"{name}.{field}"
                for field in type(before).model_fields
                if field not in PARTLY_RELOADABLE[name]
                and getattr(before, field) != getattr(after, field)
            )
        elif name not in RELOADABLE:
            keys.extend(_changed_keys(name, before, after))
    return keys


def effective(old: Config, new: Config) -> Config:
    """The configuration in force after a reload: ``new``, except for the
    settings that need a restart, which keep their ``old`` values."""
    update: dict[str, Any] = {
        name: getattr(old, name)
        for name in type(old).model_fields
        if name not in RELOADABLE
        and name not in PARTLY_RELOADABLE
        and getattr(old, name) != getattr(new, name)
    }
    for name, reloadable in PARTLY_RELOADABLE.items():
        section = getattr(new, name)
        kept = {
            field: getattr(getattr(old, name), field)
            for field in type(section).model_fields
            if field not in reloadable
        }
        update[name] = section.model_copy(update=kept)
    return new.model_copy(update=update)


def _changed_keys(prefix: str, before: object, after: object) -> list[str]:
    """``outbound.port`` rather than just ``outbound`` when a section changed."""
    if isinstance(before, BaseModel) and isinstance(after, BaseModel):
        return [
            f"{prefix}.{field}"
            for field in type(before).model_fields
            if getattr(before, field) != getattr(after, field, None)
        ] or [prefix]
    return [prefix]
