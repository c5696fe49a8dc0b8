"""main.cf and master.cf as Postfix reads them (postconf(5), master(5))."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["MainCf", "Service", "parse_main_cf", "parse_master_cf"]

# Postfix's own defaults for the few parameters other values refer to ($mydomain, ...).
_DEFAULTS = {
    "myorigin": "$myhostname",
    "mydestination": "$myhostname, localhost.$mydomain, localhost",
    "inet_interfaces": "all",
    "alias_maps": "hash:/etc/aliases",
    "recipient_delimiter": "",
    "message_size_limit": "10240000",
    "relayhost": "",
}
_REFERENCE = re.compile(r"\$(?:\{([A-Za-z0-9_]+)\}|\(([A-Za-z0-9_]+)\)|([A-Za-z0-9_]+))")


@dataclass
class MainCf:
    """The parameters set in main.cf (``raw``), and their values with ``$name`` expanded."""

    raw: dict[str, str]
    hostname: str  # for $myhostname when main.cf does not set it

    def expand(self, value: str, depth: int = 0) -> str:
        if depth > 20:  # a loop of references: leave the rest as written
            return value

        def one(match: re.Match[str]) -> str:
            name = match.group(1) or match.group(2) or match.group(3)
            return self.expand(self._value(name), depth + 1)

        return _REFERENCE.sub(one, value)

    def _value(self, name: str) -> str:
        if name in self.raw:
            return self.raw[name]
        if name == "myhostname":
            return self.hostname
        if name == "mydomain":
            host = self.get("myhostname")
            return host.split(".", 1)[1] if "." in host else "localdomain"
        return _DEFAULTS.get(name, "")

    def get(self, name: str) -> str:
        """The expanded value (Postfix's default when main.cf does not set it)."""
        return self.expand(self._value(name)).strip()

    def is_set(self, name: str) -> bool:
        return name in self.raw

    def list(self, name: str) -> list[str]:
        """A list parameter: items separated by commas and/or whitespace."""
        return [item for item in re.split(r"[\s,]+", self.get(name)) if item]


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """Lines joined with their continuations (a line starting with whitespace), with
    comments and blank lines dropped; each with the number of its first line."""
    lines: list[tuple[int, str]] = []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if line[0].isspace() and lines:
            first, joined = lines[-1]
            lines[-1] = (first, f"{joined} {stripped}")
        else:
            lines.append((number, stripped))
    return lines


def parse_main_cf(text: str, hostname: str) -> MainCf:
    raw: dict[str, str] = {}
    for _, line in _logical_lines(text):
        name, equals, value = line.partition("=")
        if equals:
            raw[name.strip()] = value.strip()  # a later line overrides, as in Postfix
    return MainCf(raw, hostname)


@dataclass
class Service:
    """One master.cf service line."""

    name: str  # "smtp", "submission", "127.0.0.1:2525", ...
    type: str  # inet, unix, fifo, pass, ...
    command: str  # smtpd, smtp, pickup, ...
    options: dict[str, str] = field(default_factory=dict)  # -o name=value
    line: int = 0


def parse_master_cf(text: str) -> list[Service]:
    services = []
    for number, line in _logical_lines(text):
        fields = line.split()
        if len(fields) < 8:
            continue
        options: dict[str, str] = {}
        args = fields[8:]
        i = 0
        while i < len(args):
            if args[i] == "-o" and i + 1 < len(args):
                name, _, value = args[i + 1].partition("=")
                options[name] = value
                i += 2
            elif args[i].startswith("-o") and len(args[i]) > 2:
                name, _, value = args[i][2:].partition("=")
                options[name] = value
                i += 1
            else:
                i += 1
        services.append(Service(fields[0], fields[1], fields[7], options, number))
    return services


def read_config_dir(directory: Path, hostname: str) -> tuple[MainCf, list[Service]]:
    main = parse_main_cf((directory / "main.cf").read_text(errors="replace"), hostname)
    master_path = directory / "master.cf"
    master = (
        parse_master_cf(master_path.read_text(errors="replace")) if master_path.exists() else []
    )
    return main, master
