"""Dropping root after the listening sockets are bound."""

from __future__ import annotations

import os
import pwd
from collections.abc import Iterable
from pathlib import Path


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


def drop_privileges(user: str) -> None:
    entry = lookup_user(user)
    if entry.pw_uid == 0:
        raise PrivilegeError(f"user = {user!r} is root; choose an unprivileged account")
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    os.environ["HOME"] = entry.pw_dir
