"""Postfix lookup tables (``type:name``), read as Postfix would read them.

``texthash:`` is the text file itself, parsed here with postmap(1)'s input rules.
The indexed types (``hash:``, ``btree:``, ``lmdb:``, ``cdb:``, ``dbm:``) are what the
indexed file holds, which may differ from the text beside it (someone forgot
``postmap``): ``postmap -s`` dumps them, and the text is read only when postmap is
missing or cannot dump (then with a note). Other types (``ldap:``, ``mysql:``,
``pcre:``, ``regexp:``, ``static:``, ...) are not tables of keys: the caller gets a
:class:`TableError` saying why, which becomes a comment in the output.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Table", "TableError", "parse_postmap_text", "read_table"]

INDEXED = ("hash", "btree", "lmdb", "cdb", "dbm", "sdbm")


class TableError(Exception):
    """The table cannot be read as keys and values; ``str()`` says why."""


@dataclass
class Table:
    spec: str  # as written in main.cf: "hash:/etc/postfix/virtual"
    entries: dict[str, str]
    notes: list[str] = field(default_factory=list)


def parse_postmap_text(text: str, aliases: bool = False) -> dict[str, str]:
    """postmap(1) input: ``key whitespace value``, ``#`` comments at line start, a line
    starting with whitespace continues the previous one; the first entry of a key wins.
    ``aliases``: postalias(1) input, ``name: value``."""
    entries: dict[str, str] = {}
    current: list[str] = []

    def flush() -> None:
        if not current:
            return
        line = " ".join(current)
        current.clear()
        if aliases:
            key, colon, value = line.partition(":")
            if not colon:
                return
        else:
            parts = line.split(None, 1)
            key, value = parts[0], parts[1] if len(parts) > 1 else ""
        key = key.strip().strip('"').lower()
        entries.setdefault(key, " ".join(value.split()))

    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0].isspace() and current:
            current.append(line.strip())
            continue
        flush()
        current.append(line.strip())
    flush()
    return entries


def _postmap(kind: str, spec: str) -> dict[str, str] | None:
    tool = shutil.which(kind) or shutil.which(kind, path="/usr/sbin")
    if tool is None:
        return None
    # An empty main.cf of our own: the imported one may name files that exist only on
    # the old server (myorigin = /etc/mailname), which would stop postmap; dumping a
    # table needs none of its settings.
    with tempfile.TemporaryDirectory(prefix="postillon-postmap-") as scratch:
        (Path(scratch) / "main.cf").write_text("")
        argv = [tool, "-c", scratch, "-s", spec]
        try:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return None
    if result.returncode != 0:
        return None
    entries: dict[str, str] = {}
    for line in result.stdout.splitlines():
        key, _, value = line.partition("\t")  # postmap -s: key TAB value
        if kind == "postalias":
            key = key.removesuffix(":")
            if key == "@" or key.upper().startswith("YP_"):
                continue  # postalias's own entries (sendmail compatibility, NIS)
        entries.setdefault(key.strip().lower(), " ".join(value.split()))
    return entries


def read_table(spec: str, config_dir: Path | None = None, aliases: bool = False) -> Table:
    """The entries of ``type:name`` (``aliases``: an alias_maps table, read with postalias)."""
    kind, colon, name = spec.partition(":")
    if not colon:
        raise TableError(f"{spec}: not a type:name table")
    kind = kind.lower()
    if kind == "proxy":  # proxy:hash:/path reads the same table through proxymap
        return read_table(name, config_dir, aliases)
    path = Path(name)
    if kind == "texthash":
        try:
            return Table(spec, parse_postmap_text(path.read_text(errors="replace"), aliases))
        except OSError as exc:
            raise TableError(f"{spec}: cannot read {path}: {exc.strerror}") from None
    if kind not in INDEXED:
        raise TableError(
            f"{spec}: a {kind}: table is not a list of keys (a query, a pattern or a "
            "constant); postillon cannot import it"
        )
    dumped = _postmap("postalias" if aliases else "postmap", spec)
    if dumped is not None:
        return Table(spec, dumped)
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        raise TableError(
            f"{spec}: postmap could not dump it and the text file {path} cannot be read "
            f"({exc.strerror})"
        ) from None
    return Table(
        spec,
        parse_postmap_text(text, aliases),
        [f"{spec}: read from the text file {path} (postmap could not dump the indexed file)"],
    )
