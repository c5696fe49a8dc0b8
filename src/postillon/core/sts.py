"""MTA-STS (RFC 8461) values: the policy file, its TXT record, a cached policy; sans-IO.

Here in ``core`` because three rooms share them: ``dnsrecords`` (``dns check``),
``outbound`` (enforcement) and ``queue`` (the policy cache every node shares).

``format_policy`` writes the file postillon serves for its own domains;
``parse_policy`` reads anyone's (and must read ours back unchanged: a unit test
keeps the two in step).

A policy is lines of ``key: value``; ``version``, ``mode`` and ``max_age`` appear once,
``mx`` once per pattern. Unknown keys are ignored (§3.2: extensions). An ``mx`` pattern
is a host name or ``*.`` plus a name, which matches exactly one more leftmost label
(§4.1: ``*.example.com`` matches ``mx1.example.com``, not ``a.b.example.com``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Mode = Literal["enforce", "testing", "none"]
# RFC 8461 §3.2: max_age is at most 31557600 seconds (about a year).
MAX_AGE_LIMIT = 31_557_600
# §3.3 lets senders cap the policy's size; 64 KiB is what common senders accept.
MAX_POLICY_BYTES = 64 * 1024

_LINE = re.compile(r"([A-Za-z0-9_]+)[ \t]*:[ \t]*(.*?)[ \t]*")
# RFC 8461 §3.1: id is 1 to 32 letters and digits.
_ID = re.compile(r"[A-Za-z0-9]{1,32}")


class PolicyError(ValueError):
    """The policy text breaks RFC 8461 §3.2; ``str()`` says which rule."""


@dataclass(frozen=True, slots=True)
class StsPolicy:
    mode: Mode
    max_age: int
    mx: tuple[str, ...]

    def covers(self, host: str) -> bool:
        """Whether an MX host ``host`` matches one of the ``mx`` patterns (§4.1)."""
        return any(mx_matches(pattern, host) for pattern in self.mx)


def mx_matches(pattern: str, host: str) -> bool:
    pattern, host = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if pattern.startswith("*."):
        first, _, rest = host.partition(".")
        return bool(first) and rest == pattern[2:]
    return host == pattern


def parse_policy(text: str) -> StsPolicy:
    """The policy in ``text``; raises :class:`PolicyError` naming the broken rule."""
    fields: dict[str, list[str]] = {}
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            continue
        match = _LINE.fullmatch(line)
        if match is None:
            raise PolicyError(f"{line[:60]!r} is not a 'key: value' line (RFC 8461 3.2)")
        fields.setdefault(match.group(1).lower(), []).append(match.group(2))
    version = fields.get("version", [])
    if version != ["STSv1"]:
        raise PolicyError("the policy must have one line 'version: STSv1' (RFC 8461 3.2)")
    modes = fields.get("mode", [])
    if len(modes) != 1 or modes[0] not in ("enforce", "testing", "none"):
        raise PolicyError("the policy must have one 'mode:' of enforce, testing or none")
    ages = fields.get("max_age", [])
    if len(ages) != 1 or not ages[0].isdigit() or int(ages[0]) > MAX_AGE_LIMIT:
        raise PolicyError(f"the policy must have one 'max_age:' of 0 to {MAX_AGE_LIMIT} seconds")
    patterns = tuple(fields.get("mx", []))
    mode: Mode = modes[0]  # type: ignore[assignment]
    if not patterns and mode != "none":
        raise PolicyError(f"mode {mode} needs at least one 'mx:' line (RFC 8461 3.2)")
    return StsPolicy(mode, int(ages[0]), patterns)


def record_id(texts: list[str]) -> str | None:
    """The ``id`` of a domain's ``_mta-sts`` TXT records, or None for "no policy".

    RFC 8461 §3.1: records not starting with ``v=STSv1;`` are discarded; unless exactly
    one is left and it is well-formed (``v`` first, one ``id`` of 1-32 letters and
    digits), the domain has no available policy.
    """
    found = [t for t in texts if re.match(r"v=STSv1[ \t]*(;|$)", t)]
    if len(found) != 1:
        return None
    ids = []
    for part in found[0].split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key.strip() == "id":
            ids.append(value.strip())
    if len(ids) != 1 or not _ID.fullmatch(ids[0]):
        return None
    return ids[0]


@dataclass(frozen=True, slots=True)
class CachedPolicy:
    """A fetched policy as the queue store keeps it (every node of a cluster shares it).

    ``policy_id`` is the TXT record's ``id`` when it was fetched (a new id means a new
    policy, RFC 8461 §3.1); the policy holds until ``fetched_at + max_age`` (§3.2).
    ``checked_at`` is when a refresh last confirmed it (fetch or unchanged id), for the
    operator's view; ``last_error`` the last failed refresh, "" when it went well.
    """

    domain: str
    policy_id: str
    policy: StsPolicy
    fetched_at: float
    checked_at: float = 0.0
    last_error: str = ""

    @property
    def expires_at(self) -> float:
        return self.fetched_at + self.policy.max_age

    def fresh(self, now: float) -> bool:
        return now < self.expires_at


def format_policy(policy: StsPolicy) -> str:
    """The policy file for ``policy`` (RFC 8461 §3.2), in the order of the RFC's
    example: ``version``, ``mode``, one ``mx`` line per pattern, ``max_age``, each line
    ended by CRLF (§3.2 allows LF or CRLF; its example uses CRLF). Raises
    :class:`PolicyError` for a policy ``parse_policy`` would refuse."""
    if policy.mode not in ("enforce", "testing", "none"):
        raise PolicyError(f"mode {policy.mode!r} is not enforce, testing or none")
    if not 0 <= policy.max_age <= MAX_AGE_LIMIT:
        raise PolicyError(f"max_age {policy.max_age} is not 0 to {MAX_AGE_LIMIT} seconds")
    if not policy.mx and policy.mode != "none":
        raise PolicyError(f"mode {policy.mode} needs at least one mx pattern (RFC 8461 3.2)")
    for pattern in policy.mx:
        if not pattern or any(c in pattern for c in " \t\r\n:"):
            raise PolicyError(f"{pattern!r} is not an mx pattern")
    lines = ["version: STSv1", f"mode: {policy.mode}"]
    lines.extend(f"mx: {pattern}" for pattern in policy.mx)
    lines.append(f"max_age: {policy.max_age}")
    return "".join(line + "\r\n" for line in lines)
