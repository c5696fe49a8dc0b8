"""Files written where someone else may have planted a link.

The data directory belongs to the server's unprivileged user, but root writes in it
too (``postillon admin token``, ``dkim keygen``, the start before the privilege drop).
Whatever root opens there by name may be a symlink the user put in its place, and a
plain ``open(O_CREAT|O_TRUNC)`` would then overwrite (or ``chown``) the file it points
to: ``/etc/shadow`` given to the service user. The rules kept here (chasquid's
``safeio`` is the model for the durable part):

1. A new file is created under a fresh random name with ``O_CREAT|O_EXCL|O_NOFOLLOW``
   (a name that exists, link or not, fails), its mode set with ``fchmod`` (whatever
   the umask) and its owner with ``fchown`` on the descriptor, never by name.
2. Write, ``fsync``, then ``rename`` over the final name: a rename replaces a link
   that sits there, it never writes through it. Then ``fsync`` the directory.
3. A directory is changed (owner, mode) through a descriptor opened with
   ``O_DIRECTORY|O_NOFOLLOW``, so a symlink in its place fails instead of being followed.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def write_file(
    path: Path, data: bytes, mode: int = 0o600, owner: tuple[int, int] | None = None
) -> None:
    """Durably replace ``path`` with ``data`` (rules 1 and 2); ``owner``: (uid, gid)
    to give it before it appears under its name. Raises OSError."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, NEW_FILE, mode)
    try:
        try:
            os.fchmod(fd, mode)
            if owner is not None:
                os.fchown(fd, *owner)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, _DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_dir(directory: Path, dir_fd: int | None = None) -> int:
    """A descriptor of ``directory`` (relative to ``dir_fd`` if given); OSError
    (ELOOP, ENOTDIR) when a symlink or a file is in its place."""
    return os.open(directory, _DIRECTORY, dir_fd=dir_fd)


def set_dir_owner(
    directory: Path,
    owner: tuple[int, int] | None = None,
    mode: int | None = None,
    *,
    dir_fd: int | None = None,
    fd: int | None = None,
) -> None:
    """Give ``directory`` an owner and/or mode (rule 3): through ``fd`` when the
    caller has it open, else opened here (relative to ``dir_fd`` if given)."""
    own = fd is None
    if fd is None:
        fd = open_dir(directory, dir_fd)
    try:
        if owner is not None:
            os.fchown(fd, *owner)
        if mode is not None:
            os.fchmod(fd, mode)
    finally:
        if own:
            os.close(fd)


def owner_of(directory: Path) -> tuple[int, int]:
    """(uid, gid) of ``directory`` itself, not of what a link there points to."""
    st = os.lstat(directory)
    return st.st_uid, st.st_gid
