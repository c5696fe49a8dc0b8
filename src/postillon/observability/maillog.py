"""The mail log: one line per event, each with the queue id, so that
``grep QUEUEID`` tells a message's whole story (Postfix's maillog habit).

Events: ``received``, ``rejected``, ``delivered``, ``deferred``, ``bounced``,
``expired``, ``bounce`` (the notification's own queue id), ``authenticated``,
``auth_failed`` (never with the password), ``warning`` (sender policy in warn
mode), ``error``.
Text lines look like ``QUEUEID: delivered: to=<a@b>, relay=maildir, ...``;
JSON lines carry the same fields as keys. Values from outside (remote
replies, client names) are written as they are here; ``logtext.SafeFormatter``,
on every handler, escapes their control characters on the way out.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from postillon.config.model import ConfigError, LogConfig
from postillon.observability.logtext import SafeFormatter, json_line
from postillon.observability.syslog import SyslogHandler

# Called with (event, queue_id, fields) for every event; must not block or raise.
EventListener = Callable[[str, str, dict[str, Any]], None]

_LOGGER_NAME = "postillon.mail"


class MailLog:
    def __init__(self, logger: logging.Logger, fmt: Literal["text", "json"] = "text") -> None:
        self._logger = logger
        self._json = fmt == "json"
        self._listeners: list[EventListener] = []

    def subscribe(self, listener: EventListener) -> None:
        """Also hand every event to ``listener`` (the message history, metrics)."""
        self._listeners.append(listener)

    def set_format(self, fmt: Literal["text", "json"]) -> None:
        self._json = fmt == "json"

    def event(self, event: str, queue_id: str = "", /, **fields: Any) -> None:
        for listener in self._listeners:
            listener(event, queue_id, fields)
        if not self._logger.isEnabledFor(logging.INFO):
            return
        if self._json:
            record = {"ts": round(time.time(), 3), "event": event}
            if queue_id:
                record["queue_id"] = queue_id
            record.update({k: v for k, v in fields.items() if v is not None})
            self._emit(json_line(json.dumps(record, default=str, ensure_ascii=False)))
            return
        parts = []
        for key, value in fields.items():
            if value is None:
                continue
            text = str(value)
            if key in ("from", "to", "orig_to") or key.endswith("_addr"):
                text = f"<{text}>"
            elif any(c in text for c in ", =") and not (key == "status" or text.startswith("(")):
                text = f"({text})"
            parts.append(f"{key}={text}")
        prefix = f"{queue_id}: " if queue_id else ""
        self._emit(f"{prefix}{event}: {', '.join(parts)}")

    def _emit(self, line: str) -> None:
        """``logger.info(line)`` without its search of the stack for the caller
        (``findCaller``): no format of ours shows it, and a few events per message
        made it a visible part of the server's CPU (issue 19's profile)."""
        logger = self._logger
        logger.handle(logger.makeRecord(logger.name, logging.INFO, __file__, 0, line, (), None))


def setup_logging(fmt: Literal["text", "json"], file: Path | None, level: str = "info") -> MailLog:
    """Configure the process's log handler once (stderr or a file)."""
    return configure_logging(LogConfig(format=fmt, file=file, level=level))


def configure_logging(
    config: LogConfig, maillog: MailLog | None = None, hostname: str | None = None
) -> MailLog:
    """(Re)configure the ``postillon`` logger from ``[log]``.

    Called at start and again on every reload: the old handler is closed and
    a new one opened, so a log file renamed by logrotate is reopened under
    its configured name. ``maillog``, when given, is switched to the new
    format in place (every component keeps its reference).
    """
    root = logging.getLogger("postillon")
    try:
        handler = _handler(config, hostname)
    except OSError as exc:
        kind, path = config.destination
        key = "log.target" if config.target is not None else "log.file"
        what = "connect to the syslog socket" if kind == "syslog" else "open"
        raise ConfigError(f"{key}: cannot {what} {path}: {exc.strerror or exc}") from None
    old = list(root.handlers)
    root.handlers = [handler]
    for previous in old:
        previous.close()
    root.setLevel(config.level.upper())
    root.propagate = False
    if maillog is None:
        return MailLog(logging.getLogger(_LOGGER_NAME), config.format)
    maillog.set_format(config.format)
    return maillog


def _handler(config: LogConfig, hostname: str | None) -> logging.Handler:
    kind, path = config.destination
    handler: logging.Handler
    if kind == "syslog":
        assert path is not None
        handler = SyslogHandler(
            path, rfc=config.syslog_format, facility=config.syslog_facility, hostname=hostname
        )
        # Syslog adds its own timestamp, host and program name.
        handler.setFormatter(SafeFormatter("%(message)s"))
        return handler
    if kind == "file":
        assert path is not None
        path.parent.mkdir(parents=True, exist_ok=True)
        # Created 0640, not with the umask's usual 0644: the mail log names
        # every sender and recipient, which is not for every local user.
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640))
        handler = logging.FileHandler(path, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    if config.format == "json":
        handler.setFormatter(SafeFormatter("%(message)s"))
    else:
        handler.setFormatter(
            SafeFormatter("%(asctime)s postillon[%(process)d]: %(message)s", "%b %d %H:%M:%S")
        )
    return handler


def null_maillog() -> MailLog:
    logger = logging.getLogger(_LOGGER_NAME + ".null")
    logger.disabled = True
    return MailLog(logger)
