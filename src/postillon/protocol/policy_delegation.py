"""The Postfix SMTP access policy delegation protocol (SMTPD_POLICY_README), sans-IO.

Design note
-----------
A request is ``name=value`` lines ending in an empty line; the policy server answers
the same way, with at least ``action=...`` (``postgrey``, ``policyd-spf``, ``postfwd``
all speak it). One connection carries any number of request/response pairs.

* :func:`encode_request` - attributes in, bytes out. A value never carries a line break
  (a client-controlled value such as the HELO name could otherwise forge attributes), and
  a name is ``[a-z0-9_]+``.
* :class:`ResponseReader` - bytes in (``receive_data``), a :class:`PolicyResponse` out
  (``next_response``) once the empty line arrived; a line longer than ``MAX_LINE`` or a
  response of more than ``MAX_ATTRIBUTES`` lines, or one without ``action=``, raises
  :class:`PolicyProtocolError` (the caller then applies its default action).
* :func:`parse_action` - the ``action=`` text (Postfix ``access(5)``) into an
  :class:`Action` value: ``DUNNO``/``OK`` go on, ``REJECT``/``DEFER``/``DEFER_IF_PERMIT``/
  ``4NN``/``5NN`` carry a ``Reply``, ``PREPEND`` a header field, ``DISCARD``/``HOLD``,
  ``WARN``/``INFO`` a log text. Actions postillon does not implement (``REDIRECT``,
  ``FILTER``, ``BCC``, ``DEFER_IF_REJECT``) come back as ``unsupported``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

from postillon.core.reply import Reply

__all__ = [
    "MAX_ATTRIBUTES",
    "MAX_LINE",
    "Action",
    "PolicyProtocolError",
    "PolicyResponse",
    "ResponseReader",
    "encode_request",
    "parse_action",
]

MAX_LINE: Final = 4096  # octets per response line (Postfix's own line limit is the same order)
MAX_ATTRIBUTES: Final = 100  # lines per response

_NAME = re.compile(r"[a-z0-9_]+")


class PolicyProtocolError(Exception):
    """The policy server's answer is not the protocol (the caller's default action applies)."""


def _clean(value: str) -> str:
    # Line breaks and NULs would end the attribute (or the request) early: a client
    # could inject attributes through its HELO name. Postfix replaces them likewise.
    return value.replace("\r", " ").replace("\n", " ").replace("\0", " ")


def encode_request(attributes: Mapping[str, str]) -> bytes:
    """One request: ``name=value`` lines in the given order, then the empty line."""
    lines = []
    for name, value in attributes.items():
        if not _NAME.fullmatch(name):
            raise ValueError(f"bad policy attribute name {name!r}")
        lines.append(f"{name}={_clean(value)}\n")
    return ("".join(lines) + "\n").encode("utf-8", "surrogateescape")


@dataclass(frozen=True, slots=True)
class PolicyResponse:
    action: str
    attributes: Mapping[str, str] = field(default_factory=dict)


class ResponseReader:
    """Bytes from the policy server in; complete responses out, in order."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._lines: list[str] = []
        self._responses: list[PolicyResponse] = []

    def receive_data(self, data: bytes) -> None:
        self._buffer += data
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > MAX_LINE:
                    raise PolicyProtocolError(f"a response line longer than {MAX_LINE} octets")
                return
            raw = bytes(self._buffer[:end]).rstrip(b"\r")
            del self._buffer[: end + 1]
            if len(raw) > MAX_LINE:
                raise PolicyProtocolError(f"a response line longer than {MAX_LINE} octets")
            if raw:
                if len(self._lines) >= MAX_ATTRIBUTES:
                    raise PolicyProtocolError(f"more than {MAX_ATTRIBUTES} response lines")
                self._lines.append(raw.decode("utf-8", "replace"))
                continue
            self._responses.append(self._finish())

    def _finish(self) -> PolicyResponse:
        lines, self._lines = self._lines, []
        attributes: dict[str, str] = {}
        for line in lines:
            name, sep, value = line.partition("=")
            if not sep:
                raise PolicyProtocolError(f"response line without '=': {line[:80]!r}")
            attributes.setdefault(name.strip().lower(), value.strip())
        action = attributes.get("action")
        if action is None:
            raise PolicyProtocolError("response without action=")
        return PolicyResponse(action, attributes)

    def next_response(self) -> PolicyResponse | None:
        return self._responses.pop(0) if self._responses else None

    @property
    def pending(self) -> bool:
        """True while part of a response has arrived (a close now is an error)."""
        return bool(self._buffer or self._lines)


Kind = Literal["dunno", "ok", "reply", "prepend", "discard", "hold", "warn", "info", "unsupported"]


@dataclass(frozen=True, slots=True)
class Action:
    kind: Kind
    reply: Reply | None = None  # kind "reply": what the client is told
    text: str = ""  # the header field (prepend), the log text, or the action itself


_CODE = re.compile(r"([45])(\d\d)(?:\s+(.*))?$", re.S)
_STATUS = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?:\s+(.*))?$", re.S)


def _reply(code: int, text: str, default_text: str) -> Reply:
    """``code`` with ``text``, which may open with an enhanced status code (RFC 3463);
    without one, x.7.1 (delivery not authorized), as Postfix does."""
    status = f"{code // 100}.7.1"
    found = _STATUS.match(text)
    if found and found.group(1) == str(code // 100):
        status = f"{found.group(1)}.{found.group(2)}.{found.group(3)}"
        text = found.group(4) or ""
    return Reply.of(code, status, text.strip() or default_text)


def parse_action(action: str) -> Action:
    """The ``action=`` value as Postfix ``access(5)`` reads it (see the module note)."""
    word, _, rest = action.strip().partition(" ")
    rest = rest.strip()
    verb = word.upper()
    if verb in ("DUNNO", ""):
        return Action("dunno")
    if verb == "OK":
        return Action("ok")
    if verb == "REJECT":
        return Action("reply", _reply(554, rest, "Access denied"))
    if verb in ("DEFER", "DEFER_IF_PERMIT"):
        return Action("reply", _reply(450, rest, "Try again later"))
    if verb == "PREPEND":
        name, colon, _ = rest.partition(":")
        if not colon or not name or not re.fullmatch(r"[!-9;-~]+", name):
            return Action("unsupported", text=action.strip())
        return Action("prepend", text=rest)
    if verb in ("DISCARD", "HOLD", "WARN", "INFO"):
        return Action(verb.lower(), text=rest)  # type: ignore[arg-type]
    code = _CODE.match(action.strip())
    if code is not None:
        number = int(code.group(1) + code.group(2))
        default = "Try again later" if number < 500 else "Access denied"
        return Action("reply", _reply(number, code.group(3) or "", default))
    return Action("unsupported", text=action.strip())
