"""The systemd unit and the logrotate snippet, filled in for one installation."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

__all__ = ["render_logrotate", "render_unit"]


def _template(name: str) -> str:
    return (files("postillon.provision") / "files" / name).read_text(encoding="utf-8")


def _fill(text: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    if "@" in text.replace("@system-service", ""):
        leftover = [w for w in text.split() if w.startswith("@") and w.endswith("@")]
        if leftover:
            raise ValueError(f"template placeholders not filled: {leftover}")
    return text


def render_unit(*, postillon: Path, config: Path, data_dir: Path, user: str) -> str:
    """``postillon.service`` for this installation (paths as the running system sees them)."""
    return _fill(
        _template("postillon.service"),
        {
            "POSTILLON": str(postillon),
            "CONFIG": str(config),
            "DATA_DIR": str(data_dir),
            "USER": user,
        },
    )


def render_logrotate(
    *, log_dir: Path, user: str, group: str, reopen_command: str | None = None
) -> str:
    """``/etc/logrotate.d/postillon``; the server reopens its log on SIGUSR1."""
    command = reopen_command or (
        "systemctl kill --kill-whom=main --signal=SIGUSR1 postillon.service 2>/dev/null || true"
    )
    return _fill(
        _template("postillon.logrotate"),
        {"LOG_DIR": str(log_dir), "USER": user, "GROUP": group, "REOPEN_COMMAND": command},
    )
