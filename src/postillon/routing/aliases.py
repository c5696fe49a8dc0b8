"""Alias tables in ``/etc/aliases`` format (aliases(5), as read by Postfix's postalias).

Design note
-----------
An alias file maps a local name to a list of targets::

    # comment
    postmaster: root
    root:       alice, bob@remote.test
    staff:      alice,
                bob          # a line starting with whitespace continues the entry
    "sales team": carol

The parser turns the text into an :class:`AliasTable`, a ``dict[str, tuple[str, ...]]``
with a ``warnings`` attribute: names are unquoted and
lower-cased (local parts are compared case-insensitively); targets are kept as written
(the domain of ``user@domain`` lower-cased, a ``<...>`` wrapper removed) so a remote
system's case-sensitive local part survives. Resolution (``routing/local.py``) reads
the targets again with :func:`parse_target`.

postillon delivers to Maildir, LMTP and SMTP only, so the three "program" forms of
aliases(5) are *not supported*: ``:include:/file``, ``|command`` and ``/file``. They
are dropped with a warning naming ``file:line`` (never an exception: a stock
``/etc/aliases`` must not stop the server); an entry left with no target expands to
nothing, and resolution rejects it with 550 5.1.1. Everything else that cannot be
read (no colon, an unterminated quote, a malformed address) is an
:class:`AliasesError` naming file and line: the operator sees the mistake at start-up
instead of as lost mail.

Rules, following Postfix where aliases(5) is vague:

* ``#`` starts a comment only at the start of a line (after optional whitespace).
  Blank and comment lines are skipped and do not end an entry.
* A duplicate name in one source keeps the first entry (postalias "duplicate entry")
  with a warning. Across sources a later source overrides (see :func:`merge_aliases`).
* ``\\name`` targets the mailbox ``name`` directly, without further alias expansion
  (sendmail/Postfix ``root: \\root, alice``).
* A name with a domain (``alice@example.org: ...``) is not an aliases(5) name; it is
  skipped with a warning (per-domain aliases live in ``[[domain]] aliases``).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from postillon.core.address import AddressError, closing_quote, parse_mailbox

__all__ = [
    "AliasTable",
    "AliasTarget",
    "AliasWarning",
    "AliasesError",
    "UnsupportedTarget",
    "load_aliases",
    "merge_aliases",
    "normalize_alias_map",
    "parse_aliases",
    "parse_target",
]


class AliasesError(ValueError):
    """An alias source cannot be read; ``str()`` names the source and line."""

    def __init__(self, source: str, line: int, message: str) -> None:
        self.source = source
        self.line = line
        self.message = message
        where = f"{source}:{line}" if line else source
        super().__init__(f"{where}: {message}")


class UnsupportedTarget(ValueError):
    """A target form postillon does not deliver to (``|cmd``, ``/file``, ``:include:``)."""


@dataclass(frozen=True, slots=True)
class AliasWarning:
    source: str
    line: int  # 0 when the source has no lines (the config map)
    message: str

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line else self.source
        return f"{where}: {self.message}"


class AliasTable(dict[str, tuple[str, ...]]):
    """Parsed aliases: a dict from lower-cased name to targets, plus ``warnings``
    (unsupported targets, duplicates) for the operator's log."""

    def __init__(
        self,
        entries: Mapping[str, tuple[str, ...]] | None = None,
        warnings: Iterable[AliasWarning] = (),
    ) -> None:
        super().__init__(entries or {})
        self.warnings: tuple[AliasWarning, ...] = tuple(warnings)


@dataclass(frozen=True, slots=True)
class AliasTarget:
    """One target of an alias, parsed.

    ``domain`` is ``""`` for a bare name (a local part of the domain being resolved).
    ``local`` is kept as written (a quoted local part keeps its quotes).
    ``verbatim`` marks ``\\name``: the mailbox itself, no further alias expansion.
    """

    local: str
    domain: str = ""
    verbatim: bool = False

    def __str__(self) -> str:
        text = f"{self.local}@{self.domain}" if self.domain else self.local
        return "\\" + text if self.verbatim else text


_PLACEHOLDER_DOMAIN = "localhost"  # only used to validate a bare local part's syntax


def parse_target(text: str) -> AliasTarget:
    """Parse one alias target.

    Raises :class:`UnsupportedTarget` for ``|command``, ``/file`` and ``:include:``
    (also in their quoted forms) and :class:`ValueError` for anything that is not
    ``name``, ``\\name``, ``local@domain`` or ``<local@domain>``.
    """
    item = text.strip()
    inner = item
    if (
        len(item) >= 2
        and item[0] == '"'
        and item[-1] == '"'
        and closing_quote(item, 0) == len(item) - 1
    ):
        inner = _unquote(item)
    if inner.startswith("|"):
        raise UnsupportedTarget(f"pipe target {item!r} is not supported")
    if inner.startswith("/"):
        raise UnsupportedTarget(f"file target {item!r} is not supported")
    if inner[:9].lower() == ":include:":
        raise UnsupportedTarget(f"include target {item!r} is not supported")
    verbatim = item.startswith("\\")
    if verbatim:
        item = item[1:]
    if item.startswith("<") and item.endswith(">"):
        item = item[1:-1]
    if not item:
        raise ValueError("empty target")
    at = _split_at(item)
    try:
        if at < 0:
            if verbatim and item.startswith('"'):
                raise ValueError(f"invalid target {text.strip()!r}")
            parse_mailbox(f"{item}@{_PLACEHOLDER_DOMAIN}", smtputf8=True)
            return AliasTarget(item, "", verbatim)
        address = parse_mailbox(item, smtputf8=True)
    except AddressError as exc:
        raise ValueError(f"invalid target {text.strip()!r}: {exc}") from None
    return AliasTarget(address.local_part, address.domain, verbatim)


def _unquote(quoted: str) -> str:
    out: list[str] = []
    i = 1
    end = len(quoted) - 1
    while i < end:
        if quoted[i] == "\\" and i + 1 < end:
            i += 1
        out.append(quoted[i])
        i += 1
    return "".join(out)


def _split_at(item: str) -> int:
    """Position of the ``@`` that ends the local part (outside quotes), or -1."""
    i = 0
    while i < len(item):
        c = item[i]
        if c == '"':
            close = closing_quote(item, i)
            if close < 0:
                return -1
            i = close + 1
            continue
        if c == "@":
            return i
        i += 1
    return -1


class _Lines:
    """A logical line assembled from physical lines; maps offsets back to line numbers."""

    def __init__(self, lineno: int, text: str) -> None:
        self.first = lineno
        self.text = text
        self.starts = [0]
        self.numbers = [lineno]

    def extend(self, lineno: int, text: str) -> None:
        self.text += " "  # the line break is whitespace
        self.starts.append(len(self.text))
        self.numbers.append(lineno)
        self.text += text

    def line_at(self, offset: int) -> int:
        return self.numbers[max(0, bisect.bisect_right(self.starts, offset) - 1)]


def _split_targets(logical: _Lines, start: int, source: str) -> list[tuple[str, int]]:
    """Split the value part at commas outside quotes: ``[(item, physical line)]``."""
    text = logical.text
    items: list[tuple[str, int]] = []
    i = start
    item_start = start
    while i <= len(text):
        if i == len(text) or text[i] == ",":
            raw = text[item_start:i]
            stripped = raw.strip()
            if stripped:
                offset = item_start + (len(raw) - len(raw.lstrip()))
                items.append((stripped, logical.line_at(offset)))
            item_start = i + 1
            i += 1
            continue
        if text[i] == '"':
            close = closing_quote(text, i)
            if close < 0:
                raise AliasesError(source, logical.line_at(i), "unterminated quoted string")
            i = close + 1
            continue
        i += 1
    return items


def _has_unquoted_space(item: str) -> bool:
    i = 0
    while i < len(item):
        c = item[i]
        if c == '"':
            close = closing_quote(item, i)
            if close < 0:
                return False
            i = close + 1
            continue
        if c.isspace():
            return True
        i += 1
    return False


def _parse_name(logical: _Lines, source: str) -> tuple[str, int]:
    """The entry's name (unquoted, lower-cased) and the offset after its colon."""
    text = logical.text
    if text.startswith('"'):
        close = closing_quote(text, 0)
        if close < 0:
            raise AliasesError(source, logical.first, "unterminated quoted name")
        name = _unquote(text[: close + 1])
        rest = close + 1
        while rest < len(text) and text[rest] in " \t":
            rest += 1
        if rest >= len(text) or text[rest] != ":":
            raise AliasesError(source, logical.first, "expected ':' after the quoted name")
        colon = rest
    else:
        colon = text.find(":")
        if colon < 0:
            raise AliasesError(source, logical.first, "expected 'name: target, ...'")
        name = text[:colon].strip()
        if any(c.isspace() for c in name):
            raise AliasesError(
                source, logical.first, f"name {name!r} contains whitespace (quote it)"
            )
    if not name:
        raise AliasesError(source, logical.first, "empty alias name")
    return name.lower(), colon + 1


def _parse_entry(
    logical: _Lines,
    source: str,
    entries: dict[str, tuple[str, ...]],
    first_line: dict[str, int],
    warnings: list[AliasWarning],
) -> None:
    name, value_start = _parse_name(logical, source)
    if "@" in name:
        warnings.append(
            AliasWarning(
                source,
                logical.first,
                f"alias name {name!r} has a domain; aliases(5) names are local parts; ignored",
            )
        )
        return
    targets: list[str] = []
    for item, lineno in _split_targets(logical, value_start, source):
        try:
            target = parse_target(item)
        except UnsupportedTarget as exc:
            warnings.append(AliasWarning(source, lineno, f"alias {name!r}: {exc}; ignored"))
            continue
        except ValueError as exc:
            if _has_unquoted_space(item):
                message = f"alias {name!r}: {item!r}: separate targets with ','"
            else:
                message = f"alias {name!r}: {exc}"
            raise AliasesError(source, lineno, message) from None
        text = str(target)
        if text not in targets:
            targets.append(text)
    if name in entries:
        warnings.append(
            AliasWarning(
                source,
                logical.first,
                f"duplicate alias {name!r} (first at line {first_line[name]}); ignored",
            )
        )
        return
    if not targets:
        warnings.append(
            AliasWarning(source, logical.first, f"alias {name!r} has no deliverable target")
        )
    entries[name] = tuple(targets)
    first_line[name] = logical.first


def parse_aliases(text: str, *, source: str = "<aliases>") -> AliasTable:
    """Parse aliases(5) text. Raises :class:`AliasesError` naming ``source:line``."""
    entries: dict[str, tuple[str, ...]] = {}
    first_line: dict[str, int] = {}
    warnings: list[AliasWarning] = []
    current: _Lines | None = None
    for lineno, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if line[0] in " \t":
            if current is None:
                raise AliasesError(source, lineno, "continuation line without an entry before it")
            current.extend(lineno, line)
            continue
        if current is not None:
            _parse_entry(current, source, entries, first_line, warnings)
        current = _Lines(lineno, line)
    if current is not None:
        _parse_entry(current, source, entries, first_line, warnings)
    return AliasTable(entries, tuple(warnings))


def load_aliases(path: Path) -> AliasTable:
    """Read and parse one aliases file (UTF-8). Errors name the file and line."""
    source = str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise AliasesError(source, 0, f"cannot read aliases file: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise AliasesError(source, line, "not valid UTF-8") from None
    return parse_aliases(text, source=source)


def normalize_alias_map(mapping: Mapping[str, Sequence[str]], *, source: str) -> AliasTable:
    """Validate a configured map (``[aliases] map`` or a domain's ``aliases``).

    Same rules as a file: names lower-cased, unsupported targets dropped with a
    warning, malformed ones an :class:`AliasesError` naming ``source`` and the name.
    Two names that differ only in case: the first wins, with a warning.
    """
    entries: dict[str, tuple[str, ...]] = {}
    warnings: list[AliasWarning] = []
    for raw_name, raw_targets in mapping.items():
        name = raw_name.strip()
        if name.startswith('"') and closing_quote(name, 0) == len(name) - 1:
            name = _unquote(name)
        name = name.lower()
        where = f"{source} {raw_name!r}"
        if not name:
            raise AliasesError(source, 0, "empty alias name")
        if "@" in name:
            warnings.append(
                AliasWarning(source, 0, f"alias name {raw_name!r} has a domain; ignored")
            )
            continue
        if isinstance(raw_targets, str):
            raise AliasesError(where, 0, "targets must be a list of addresses")
        targets: list[str] = []
        for item in raw_targets:
            try:
                text = str(parse_target(item))
            except UnsupportedTarget as exc:
                warnings.append(AliasWarning(where, 0, f"{exc}; ignored"))
                continue
            except ValueError as exc:
                raise AliasesError(where, 0, str(exc)) from None
            if text not in targets:
                targets.append(text)
        if name in entries:
            warnings.append(AliasWarning(where, 0, f"duplicate alias {name!r}; ignored"))
            continue
        entries[name] = tuple(targets)
    return AliasTable(entries, tuple(warnings))


def merge_aliases(
    files: Iterable[Path] = (),
    extra: Mapping[str, Sequence[str]] | None = None,
    *,
    extra_source: str = "[aliases] map",
) -> AliasTable:
    """All global aliases in one table for ``LocalRecipients(aliases=...)``.

    Same precedence as ``app.build_local_recipients``: a later file overrides an
    earlier one, and the config map (``extra``) overrides the files. Every overridden
    entry gives a warning, and the files' own warnings are kept.
    """
    sources: list[tuple[str, AliasTable]] = [(str(p), load_aliases(Path(p))) for p in files]
    if extra:
        sources.append((extra_source, normalize_alias_map(extra, source=extra_source)))
    entries: dict[str, tuple[str, ...]] = {}
    origin: dict[str, str] = {}
    warnings: list[AliasWarning] = []
    for source, table in sources:
        warnings.extend(table.warnings)
        for name, targets in table.items():
            if name in entries:
                warnings.append(
                    AliasWarning(source, 0, f"alias {name!r} overrides the one in {origin[name]}")
                )
            entries[name] = targets
            origin[name] = source
    return AliasTable(entries, warnings)
