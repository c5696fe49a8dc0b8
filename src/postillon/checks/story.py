"""The explain trace told as a story: numbered lines, one per step (CLI and admin)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

from postillon.core.trace import TraceStep


def _when(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S")


def step_line(step: TraceStep) -> str:
    """``connect · dnsbl: reject — saw ... → 554 5.7.1 ...``"""
    text = f"{step.phase} · {step.check}: {step.action}"
    if step.saw:
        text += f" — {step.saw}"
    if step.reply:
        text += f" → {step.reply}"
    return text


def story(steps: Sequence[TraceStep]) -> list[str]:
    """The numbered lines of one session's (or message's) steps, in order."""
    lines: list[str] = []
    if not steps:
        return lines
    first = steps[0]
    lines.append(
        f"session {first.session_id} from {first.client_ip or 'local'}, {_when(first.at)} UTC"
    )
    for n, step in enumerate(steps, 1):
        queue = f" [{step.queue_id}]" if step.queue_id else ""
        lines.append(f"{n:3d}. {_when(step.at)[11:]}{queue} {step_line(step)}")
    return lines


def by_session(steps: Iterable[TraceStep]) -> list[list[TraceStep]]:
    """Steps grouped by session, sessions in the order they first appear."""
    groups: dict[str, list[TraceStep]] = {}
    for step in steps:
        groups.setdefault(step.session_id, []).append(step)
    return list(groups.values())


def as_json(step: TraceStep) -> dict[str, object]:
    return {
        "session_id": step.session_id,
        "queue_id": step.queue_id,
        "at": step.at,
        "client_ip": step.client_ip,
        "phase": step.phase,
        "check": step.check,
        "action": step.action,
        "saw": step.saw,
        "reply": step.reply,
    }
