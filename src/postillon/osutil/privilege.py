"""Running as the service user: look it up, and drop root to it.

Here rather than in ``inbound/privileges.py`` because two rooms drop privileges: the
server after binding its ports, and each helper process (``postillon.helpers``), which
may not import ``inbound``. Standard library only.
"""

from __future__ import annotations

import os
import pwd


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


def drop_privileges(user: str) -> None:
    entry = lookup_user(user)
    if entry.pw_uid == 0:
        raise PrivilegeError(f"user = {user!r} is root; choose an unprivileged account")
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    os.environ["HOME"] = entry.pw_dir
