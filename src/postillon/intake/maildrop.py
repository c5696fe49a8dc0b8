"""The maildrop: where the ``sendmail`` command leaves messages for the server.

Design note (Postfix's ``postdrop`` + ``pickup``). The ``sendmail`` command
never talks to the server: it writes each message as one file into
``<data_dir>/maildrop/`` and exits 0 only once that file is durable. The
server's pickup task (``intake.pickup``) feeds every file through ``Intake``
and removes it after the queue commit. So a message is never lost when the
server is down: it waits in the maildrop until the server comes back.

File format (version 1), all header lines ASCII/UTF-8, ``\\n``-terminated::

    POSTILLON-MAILDROP 1
    User: alice                 (informational; the server trusts the file owner)
    Uid: 1000                   (informational, ditto)
    Sender: bob@example.org     (the -f sender; absent = default; empty = <>)
    Full-Name: Alice Example    (-F)
    Recipient: carol@example.org   (one line per recipient, at least one)
    Size: 1234                  (length of the message that follows)

    <the message, CRLF line endings>

Unknown header lines are ignored (newer writers, older servers). A file whose
magic line, header or size is wrong is corrupt; pickup moves it aside.

Atomic write: a hidden temporary name (``.tmp.*``) in the same directory,
``fsync``, ``rename`` to the final name, then ``fsync`` of the directory when
the writer may open it (the directory is not readable by other users, so for
them the rename is as durable as the file system's ordering makes it).

Permissions: the directory is owned by the server user, mode ``1733`` (anyone
may create files, nobody else may list them, and the sticky bit stops users
from removing or renaming each other's files); files are ``0644``.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from postillon.osutil.safeio import open_dir, set_dir_owner

MAGIC = b"POSTILLON-MAILDROP 1\n"
DIR_MODE = 0o1733
FILE_MODE = 0o644
TEMP_PREFIX = ".tmp."
CORRUPT = "corrupt"
# A header line longer than this is not ours (RFC 5321 paths are <= 256 octets;
# a full name has no business being longer).
MAX_HEADER_LINE = 4096

_BAD_VALUE = re.compile(r"[\x00-\x1f\x7f]")
_LINE_END = re.compile(rb"\r?\n")


class MaildropError(ValueError):
    """The file is not a valid maildrop file."""


@dataclass(frozen=True, slots=True)
class DropEnvelope:
    """What the command tells the server besides the message itself.

    ``sender`` is the requested envelope sender: ``None`` for "the default"
    (the invoking user), ``""`` for the null sender ``<>``. ``uid`` and
    ``user`` are what the writer claimed; the reader uses the file owner.
    """

    recipients: tuple[str, ...]
    sender: str | None = None
    full_name: str = ""
    uid: int = -1
    user: str = ""


def clean_value(text: str) -> str:
    """Control characters (CR, LF, NUL, tabs) become spaces: a value is one line."""
    return _BAD_VALUE.sub(" ", text).strip()


def encode(envelope: DropEnvelope, message: bytes) -> bytes:
    if not envelope.recipients:
        raise ValueError("no recipients")
    lines = [MAGIC.decode()]
    fields: list[tuple[str, str]] = [("User", envelope.user), ("Uid", str(envelope.uid))]
    if envelope.sender is not None:
        fields.append(("Sender", envelope.sender))
    if envelope.full_name:
        fields.append(("Full-Name", envelope.full_name))
    fields.extend(("Recipient", r) for r in envelope.recipients)
    fields.append(("Size", str(len(message))))
    for name, value in fields:
        if _BAD_VALUE.search(value):
            raise ValueError(f"{name} contains a control character: {value!r}")
        lines.append(f"{name}: {value}\n")
    lines.append("\n")
    return "".join(lines).encode("utf-8") + message


def decode(data: bytes) -> tuple[DropEnvelope, bytes]:
    """Parse a maildrop file held whole in memory. Raises MaildropError."""
    envelope, size, pos = decode_envelope(data)
    message = data[pos:]
    if size != len(message):
        raise MaildropError(f"Size {size} does not match the message ({len(message)} octets)")
    return envelope, message


def decode_envelope(data: bytes) -> tuple[DropEnvelope, int, int]:
    """Parse the envelope section at the start of a maildrop file: (envelope, the
    message's ``Size:``, the offset where the message starts). ``data`` needs to hold
    only the envelope section (pickup streams the message after it). Raises
    MaildropError, also when the section does not end within ``data``."""
    if not data.startswith(MAGIC):
        raise MaildropError("no maildrop magic line")
    pos = len(MAGIC)
    sender: str | None = None
    full_name = ""
    uid = -1
    user = ""
    size: int | None = None
    recipients: list[str] = []
    while True:
        end = data.find(b"\n", pos)
        if end < 0 or end - pos > MAX_HEADER_LINE:
            raise MaildropError("header section not terminated")
        line = data[pos:end]
        pos = end + 1
        if not line:
            break
        try:
            name, sep, value = line.decode("utf-8").partition(": ")
        except UnicodeDecodeError:
            raise MaildropError("header line is not UTF-8") from None
        if not sep and line.endswith(b":"):
            name, value = line[:-1].decode("utf-8"), ""
        elif not sep:
            raise MaildropError(f"malformed header line {line[:80]!r}")
        if _BAD_VALUE.search(value):
            raise MaildropError(f"control character in {name}")
        match name.lower():
            case "sender":
                sender = value
            case "full-name":
                full_name = value
            case "recipient":
                if not value:
                    raise MaildropError("empty recipient")
                recipients.append(value)
            case "uid":
                with contextlib.suppress(ValueError):
                    uid = int(value)
            case "user":
                user = value
            case "size":
                try:
                    size = int(value)
                except ValueError:
                    raise MaildropError("bad Size") from None
            case _:
                pass  # a newer writer's field
    if size is None or size < 0:
        raise MaildropError(f"Size {size} is missing or negative")
    if not recipients:
        raise MaildropError("no recipients")
    return DropEnvelope(tuple(recipients), sender, full_name, uid, user), size, pos


def to_crlf(message: bytes) -> bytes:
    """LF or CRLF line endings → CRLF (as the queue stores messages); ends with CRLF."""
    out = _LINE_END.sub(b"\r\n", message)
    if out and not out.endswith(b"\r\n"):
        out += b"\r\n"
    return out


def split_header(message: bytes) -> tuple[list[bytes], bytes]:
    """The header fields (each with its folded continuation lines and CRLF) and
    the rest (the empty line and body). ``message`` has CRLF line endings."""
    fields: list[bytes] = []
    pos = 0
    while pos < len(message):
        if message.startswith(b"\r\n", pos):
            break
        end = message.find(b"\r\n", pos)
        end = len(message) if end < 0 else end + 2
        line = message[pos:end]
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        elif b":" in line.split(b"\r\n", 1)[0]:
            fields.append(line)
        else:
            break  # not a header line: the body starts here (no empty line)
        pos = end
    return fields, message[pos:]


def field_name(field: bytes) -> str:
    return field.split(b":", 1)[0].strip().decode("ascii", "replace").lower()


def field_value(field: bytes) -> str:
    """The unfolded value, decoded (UTF-8, invalid octets replaced)."""
    value = field.split(b":", 1)[1] if b":" in field else b""
    return re.sub(r"\r\n(?=[ \t])", "", value.decode("utf-8", "replace")).strip()


def prepare_maildrop(directory: Path, uid: int | None = None, gid: int | None = None) -> Path:
    """Create the maildrop (server start): mode 1733, owned by the server user.

    Only the directory is chowned, never its files: their owner is who
    submitted them. ``corrupt/`` (mode 0700) holds files pickup could not use.
    """
    directory.mkdir(parents=True, exist_ok=True)
    owner = (uid, gid) if uid is not None and gid is not None else None
    # As root in the server user's data_dir: through descriptors that refuse a
    # symlink in a directory's place (osutil/safeio.py), never mkdir/chown/chmod by a
    # path the user could redirect between two steps.
    fd = open_dir(directory)
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(CORRUPT, 0o700, dir_fd=fd)
        set_dir_owner(directory, owner, DIR_MODE, fd=fd)
        set_dir_owner(Path(CORRUPT), owner, 0o700, dir_fd=fd)
    finally:
        os.close(fd)
    return directory


def write_drop(directory: Path, envelope: DropEnvelope, message: bytes) -> Path:
    """Write one maildrop file durably and atomically; return its final path.

    Raises OSError (the caller maps it to an exit code). Nothing half-written
    is ever visible under a final name.
    """
    data = encode(envelope, message)
    stamp = f"{int(time.time() * 1e6):x}.{os.getpid():x}.{secrets.token_hex(6)}"
    tmp = directory / f"{TEMP_PREFIX}{stamp}"
    final = directory / stamp
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
    try:
        try:
            os.fchmod(fd, FILE_MODE)  # whatever the umask
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return final  # not the owner: the directory is not readable (mode 1733)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return final
