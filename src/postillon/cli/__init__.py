"""The command line: ``postillon …`` and the sendmail-compatible entry points.

Design note (two minutes)
-------------------------
``main.py`` parses ``postillon [--config FILE] COMMAND`` and hands each command group to
its own module: ``queue_cmd.py`` (``queue_transfer.py`` for ``queue export|import``),
``user_cmd.py``, ``dkim_cmd.py``, ``dns_cmd.py``, ``db_cmd.py``, ``admin_cmd.py``,
``reload_cmd.py``; ``serve`` and ``check-config`` build the app from the config.
``sendmail.py`` is ``sendmail``, ``mailq`` and ``newaliases``. ``config_path.py`` is the one
place a command finds its configuration: ``--config FILE``, else ``$POSTILLON_CONFIG``, else
``/etc/postillon/postillon.toml``.

May import (DESIGN.md "Rooms"): ``app`` (the composition root), ``config``, and the rooms
below read-only; queue changes go through the operations the admin API uses
(``admin/queue_ops.py``).

Rules kept everywhere:

* A command does not ask the running server to do its work: it opens the same queue store
  or accounts file (both safe to use beside the server) and acts there. The only signal a
  command sends the server is SIGHUP (``reload``, ``newaliases``).
* ``sendmail`` never writes the queue: it makes the message durable in the maildrop, and
  the server's pickup queues it through ``intake`` (one way into the queue).
* Exit codes: 0 done, 1 the operation failed, 2 bad input; an error names the file and key
  or the argument at fault. ``queue … --json`` output has the admin API's shapes.
* No secret on the command line, where every user sees the process list: passwords come
  from a prompt or stdin.
"""
