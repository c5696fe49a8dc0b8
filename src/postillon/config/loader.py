"""Load TOML into the frozen model; errors name the file and the key."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from postillon.config.model import Config, ConfigError

__all__ = ["ConfigError", "load_config", "parse_config"]
from postillon.core.credentials import redact, url_password


def _key_path(loc: tuple[int | str, ...], data: dict[str, Any]) -> str:
    parts: list[str] = []
    node: Any = data
    for item in loc:
        if isinstance(item, int):
            name = ""
            if isinstance(node, list) and item < len(node) and isinstance(node[item], dict):
                name = str(node[item].get("name") or node[item].get("address") or "")
            parts[-1:] = [f"{parts[-1] if parts else ''}[{item}]" + (f" ({name})" if name else "")]
        else:
            parts.append(str(item))
        try:
            node = node[item]
        except (KeyError, IndexError, TypeError):
            node = None
    return ".".join(parts) or "(top level)"


def parse_config(data: dict[str, Any], source: str = "<config>") -> Config:
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = tuple(x for x in err["loc"] if not str(x).startswith("function-"))
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key (check the spelling; see docs/configuration.md)"
            lines.append(f"{source}: {_key_path(loc, data)}: {msg}")
        # A message may quote a URL with its password (or, for a URL that does
        # not parse, pieces of it): never print either.
        raise ConfigError(redact("\n".join(lines), *_passwords(data))) from None
    return _resolve_relative(config, Path(source).parent if source != "<config>" else None)


def _passwords(data: dict[str, Any]) -> tuple[str, ...]:
    """The passwords in the config's URLs, found leniently, to redact them."""
    urls = []
    for section, key in (("relay", "smarthost"), ("queue", "dsn")):
        table = data.get(section)
        value = table.get(key) if isinstance(table, dict) else None
        if isinstance(value, str):
            urls.append(value)
    return tuple(secret for url in urls for secret in url_password(url))


def _resolve_relative(config: Config, base: Path | None) -> Config:
    # Paths in a config file are relative to the file's directory, so a config
    # works the same wherever postillon is started from.
    if base is None:
        return config

    def fix(p: Path | None) -> Path | None:
        return p if p is None or p.is_absolute() else (base / p)

    tls = config.tls.model_copy(
        update={
            "certificate": fix(config.tls.certificate),
            "private_key": fix(config.tls.private_key),
            "acme_ca_file": fix(config.tls.acme_ca_file),
        }
    )
    aliases = config.aliases.model_copy(
        update={"files": tuple(fix(f) or f for f in config.aliases.files)}
    )
    target = config.log.target
    kind, _, rest = (target or "").partition(":")
    if kind in ("file", "syslog") and rest:
        target = f"{kind}:{fix(Path(rest))}"
    log = config.log.model_copy(update={"file": fix(config.log.file), "target": target})
    submission = config.submission.model_copy(
        update={"accounts_file": fix(config.submission.accounts_file)}
    )
    admin = config.admin.model_copy(
        update={"tls_cert": fix(config.admin.tls_cert), "tls_key": fix(config.admin.tls_key)}
    )
    tls_policy = tuple(
        rule.model_copy(update={"ca_file": fix(rule.ca_file)}) for rule in config.tls_policy
    )
    relay = config.relay.model_copy(
        update={"smarthost_ca_file": fix(config.relay.smarthost_ca_file)}
    )
    outbound = config.outbound.model_copy(update={"sts_ca_file": fix(config.outbound.sts_ca_file)})
    tls_reports = config.tls_reports.model_copy(update={"ca_file": fix(config.tls_reports.ca_file)})
    return config.model_copy(
        update={
            "outbound": outbound,
            "tls_reports": tls_reports,
            "admin": admin,
            "relay": relay,
            "tls_policy": tls_policy,
            "data_dir": fix(config.data_dir),
            "tls": tls,
            "aliases": aliases,
            "log": log,
            "submission": submission,
        }
    )


def load_config(path: Path) -> Config:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(data, str(path))
