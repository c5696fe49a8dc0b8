"""Apply header changes (``decision.AddHeader``/``ChangeHeader``) to a header section.

Pure functions on bytes. A header section here is CRLF-terminated lines without the
final empty line (intake's ``header_block``); a field is its first line plus its
continuation lines (RFC 5322 §2.2.3 folding). Names compare case-insensitively.
"""

from __future__ import annotations

from postillon.checks.decision import AddHeader, ChangeHeader


def split_fields(header: bytes) -> list[bytes]:
    """The fields of a header section, each with its folded lines and CRLFs."""
    fields: list[bytes] = []
    for line in header.splitlines(keepends=True):
        if fields and line[:1] in (b" ", b"\t"):
            fields[-1] += line
        else:
            fields.append(line)
    return fields


def field_name(field: bytes) -> str:
    return field.split(b":", 1)[0].strip().decode("ascii", "replace").lower()


def render_field(name: str, value: str) -> bytes:
    """``name: value`` with CRLF; a value with newlines is kept folded (each line
    after the first starts with white space, RFC 5322 §2.2.3)."""
    lines = value.replace("\r\n", "\n").split("\n")
    folded = "\r\n".join(
        [lines[0]] + [ln if ln[:1] in (" ", "\t") else "\t" + ln for ln in lines[1:]]
    )
    return f"{name}: {folded}\r\n".encode()


def add_header(prepend: bytes, header: bytes, change: AddHeader) -> tuple[bytes, bytes]:
    """``(prepend, header)`` after adding a field: index 0 goes on top (into
    ``prepend``, above the fields other checks added before), None at the bottom."""
    line = render_field(change.name, change.value)
    if change.index == 0:
        return prepend + line, header
    fields = split_fields(header)
    if change.index is None or change.index >= len(fields):
        fields.append(line)
    else:
        fields.insert(max(0, change.index), line)
    return prepend, b"".join(fields)


def change_header(header: bytes, change: ChangeHeader) -> bytes:
    """Replace or delete the ``occurrence``-th field named ``change.name``; a
    missing occurrence with a value adds the field at the bottom (as sendmail does)."""
    wanted = change.name.lower()
    fields = split_fields(header)
    seen = 0
    for i, field in enumerate(fields):
        if field_name(field) == wanted:
            seen += 1
            if seen == change.occurrence:
                if change.value is None:
                    del fields[i]
                else:
                    fields[i] = render_field(change.name, change.value)
                return b"".join(fields)
    if change.value is not None:
        fields.append(render_field(change.name, change.value))
    return b"".join(fields)
