"""Preparing data_dir for the server's user, and dropping root after the listening
sockets are bound."""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from postillon.intake.maildrop import prepare_maildrop
from postillon.osutil.privilege import (  # re-exported: the server and CLI use them here
    PrivilegeError,
    drop_privileges,
    lookup_user,
    running_as_root,
)

log = logging.getLogger("postillon")

__all__ = [
    "PrivilegeError",
    "chown_tree",
    "drop_privileges",
    "lookup_user",
    "prepare_data_dir",
    "running_as_root",
]


def chown_tree(path: Path, uid: int, gid: int, skip: Iterable[Path] = ()) -> list[str]:
    """Give the runtime user its data directory (queue, spool, mailboxes).

    Runs as root on every start in a tree that user controls, so it never acts on a
    name that may have been swapped: directories are walked through descriptors
    (``os.fwalk`` does not descend into a symlink, even one swapped in mid-walk),
    every file is opened with ``O_NOFOLLOW`` and changed with ``fchown``, symlinks
    are left alone (their owner grants nothing), and a file with another hard link
    that the user does not already own is refused: it may be a root file linked in
    from elsewhere. Only what is not already the user's is changed.

    ``skip`` names subtrees whose ownership means something (the maildrop: a
    file's owner is who submitted it) and must never be changed. Returns the
    paths it refused, for the log.
    """
    skipped = {os.path.abspath(p) for p in skip}
    refused: list[str] = []
    for root, dirs, files, root_fd in os.fwalk(path, follow_symlinks=False):
        dirs[:] = [d for d in dirs if os.path.abspath(os.path.join(root, d)) not in skipped]
        st = os.fstat(root_fd)
        if (st.st_uid, st.st_gid) != (uid, gid):
            os.fchown(root_fd, uid, gid)
        # fwalk lists a symlink to a directory among dirs (and never enters it):
        # it is treated here like any other name that is not a directory.
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            if not _chown_file(name, root_fd, uid, gid):
                refused.append(os.path.join(root, name))
    return refused


def _chown_file(name: str, dir_fd: int, uid: int, gid: int) -> bool:
    """fchown one entry of ``dir_fd`` (not a directory); False when refused."""
    try:
        fd = os.open(name, _OPEN_ENTRY, dir_fd=dir_fd)
    except OSError as exc:
        # ELOOP: a symlink (left as it is); ENXIO: a socket; ENOENT: gone meanwhile.
        return exc.errno in (errno.ELOOP, errno.ENXIO, errno.ENOENT)
    try:
        st = os.fstat(fd)
        if (st.st_uid, st.st_gid) == (uid, gid):
            return True
        if stat.S_ISDIR(st.st_mode) or (st.st_nlink > 1 and st.st_uid != uid):
            return False
        os.fchown(fd, uid, gid)
        return True
    finally:
        os.close(fd)


# Read-only, never following a link, never blocking on a FIFO, never a controlling tty.
_OPEN_ENTRY = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


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
    for refused in chown_tree(data_dir, entry.pw_uid, entry.pw_gid, skip=(maildrop,)):
        log.warning(
            "not giving %s to user %s: it has another hard link and may be a file from "
            "outside data_dir",
            refused,
            user,
        )
    try:
        prepare_maildrop(maildrop, entry.pw_uid, entry.pw_gid)
    except OSError as exc:
        # ELOOP/ENOTDIR: a symlink or a file where the maildrop directory should be.
        raise PrivilegeError(
            f"{maildrop}: cannot prepare the maildrop directory ({exc.strerror}); it must "
            "be a directory of its own, not a symlink"
        ) from None
    server_uids.add(entry.pw_uid)
    return frozenset(server_uids)
