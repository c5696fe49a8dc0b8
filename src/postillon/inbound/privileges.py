"""Preparing data_dir for the server's user, and dropping root after the listening
sockets are bound."""

from __future__ import annotations

import os
import pwd
from collections.abc import Iterable
from pathlib import Path

from postillon.intake.maildrop import prepare_maildrop


class PrivilegeError(Exception):
    pass


def running_as_root() -> bool:
    return os.geteuid() == 0


def lookup_user(user: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(user)
    except KeyError:
        raise PrivilegeError(
            f"user = {user!r}: no such system user. Create it (useradd --system --no-create-home "
            f"{user}) or set `user` in the config to an existing unprivileged account."
        ) from None


def chown_tree(path: Path, uid: int, gid: int, skip: Iterable[Path] = ()) -> None:
    """Give the runtime user its data directory (queue, spool, mailboxes).

    ``skip`` names subtrees whose ownership means something (the maildrop: a
    file's owner is who submitted it) and must never be changed.
    """
    os.chown(path, uid, gid)
    skipped = {os.path.abspath(p) for p in skip}
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if os.path.abspath(os.path.join(root, d)) not in skipped]
        for name in dirs + files:
            os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)


def prepare_data_dir(data_dir: Path, maildrop: Path, user: str | None) -> frozenset[int]:
    """Make ``data_dir`` ready for the server (run before the listeners bind).

    ``user``: the account the server drops to (started as root), else None. Its
    subdirectories then belong to that user, and so does the maildrop directory
    (never the files in it). Returns the uids whose maildrop files may set their
    envelope sender (``-f``): root, the server's own, and the user's.
    """
    server_uids = {0, os.geteuid()}
    if user is None:
        prepare_maildrop(maildrop)
        return frozenset(server_uids)
    entry = lookup_user(user)
    for sub in ("queue", "spool", "mail"):
        (data_dir / sub).mkdir(exist_ok=True)
    chown_tree(data_dir, entry.pw_uid, entry.pw_gid, skip=(maildrop,))
    prepare_maildrop(maildrop, entry.pw_uid, entry.pw_gid)
    server_uids.add(entry.pw_uid)
    return frozenset(server_uids)


def drop_privileges(user: str) -> None:
    entry = lookup_user(user)
    if entry.pw_uid == 0:
        raise PrivilegeError(f"user = {user!r} is root; choose an unprivileged account")
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    os.environ["HOME"] = entry.pw_dir
