"""A :class:`~postillon.postfiximport.translate.Translation` as postillon.toml text."""

from __future__ import annotations

import json
import re
from pathlib import Path

from postillon.postfiximport.translate import Translation

__all__ = ["render"]


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_toml(v)}" for k, v in value.items()) + " }"
    raise TypeError(type(value))


def _key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _comment(text: str) -> str:
    return "\n".join(f"# {line}" for line in text.splitlines())


def render(translation: Translation, source: Path, written_on: str) -> str:
    out = [
        f"# postillon.toml translated from {source} by `postillon import-postfix` on {written_on}.",
        "# Check it with `postillon check-config FILE`. Settings that were not translated",
        "# are listed at the end, each with the reason.",
    ]
    out += [_comment(f"note: {note}") for note in translation.notes]
    out += [f"{k} = {_toml(v)}" for k, v in translation.top.items()]
    for listen in translation.listen:
        out += ["", "[[listen]]", *(f"{k} = {_toml(v)}" for k, v in listen.items())]
    for name, values in translation.sections.items():
        if values:
            out += ["", f"[{name}]", *(f"{_key(k)} = {_toml(v)}" for k, v in values.items())]
    for domain, values in sorted(translation.domains.items()):
        out += ["", "[[domain]]", f"name = {_toml(domain)}"]
        out += [f"{k} = {_toml(v)}" for k, v in values.items()]
    for rule in translation.transports:
        out += ["", "[[transport]]", *(f"{k} = {_toml(v)}" for k, v in rule.items())]
    if translation.untranslated:
        out += ["", "# Not translated:"]
        for setting, why in translation.untranslated:
            out += [_comment(f"  {setting}"), _comment(f"    -> {why}")]
    return "\n".join(out) + "\n"
