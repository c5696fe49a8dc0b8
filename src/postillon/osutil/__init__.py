"""This machine's files and users: the few operating-system steps several rooms share.

Design note (two minutes)
-------------------------
``safeio.py`` writes files where someone else may have planted a link (``O_EXCL|O_NOFOLLOW``,
``fchmod``/``fchown`` on the descriptor, fsync, rename, fsync the directory);
``privilege.py`` looks up the service user and drops root to it (the server after binding
its ports, each helper process at its start).

Not in ``core``: ``core`` holds domain values and does no I/O. Standard library only; every
room may import this one (``tests/unit/test_import_rules.py``, ``EVERYONE``).
"""
