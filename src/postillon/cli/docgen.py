"""The configuration reference, generated from the config model so it cannot drift.

Walks ``Config`` (pydantic v2): every section (``[name]`` for a model field, ``[[name]]``
for a tuple of models, nested as ``[a.b]``) and every key with its TOML type, default,
limits (``ge``/``gt``/...) and what it does. What a key does comes from its
``Field(description=...)``; a key without one is described by the comments written
beside it in the model's source (the lines just above it and a comment on its own line),
which is how most of the model documents itself. A section's text is its class
docstring.

``reference()`` gives the model as data; ``markdown()`` renders ``docs/configuration.md``
and ``man5()`` the ``postillon.toml(5)`` page. Nothing here depends on the machine,
the time or the terminal: the output is compared with the committed files by
``tests/unit/test_generated_docs.py``.
"""

from __future__ import annotations

import ast
import inspect
import io
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from postillon.config.model import Config


@dataclass(frozen=True, slots=True)
class Key:
    name: str
    type: str
    default: str
    description: str


@dataclass(frozen=True, slots=True)
class Section:
    """``name`` is "" for the top level, ``"tls"``, ``"dkim.key"``...; ``array`` for
    ``[[name]]`` (a list of tables)."""

    name: str
    array: bool
    description: str
    keys: tuple[Key, ...]

    @property
    def header(self) -> str:
        if not self.name:
            return "top level"
        return f"[[{self.name}]]" if self.array else f"[{self.name}]"


def reference() -> list[Section]:
    sections: list[Section] = []
    _walk(Config, "", False, sections)
    return sections


def _model_of(annotation: Any) -> tuple[type[BaseModel], bool] | None:
    """(model, is_array) when the annotation is a model or a tuple of models."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    if typing.get_origin(annotation) is tuple:
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            inner = args[0]
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                return inner, True
    return None


def _walk(model: type[BaseModel], name: str, array: bool, out: list[Section]) -> None:
    keys: list[Key] = []
    nested: list[tuple[type[BaseModel], str, bool]] = []
    comments = _field_comments(model)
    for field_name, info in model.model_fields.items():
        sub = _model_of(info.annotation)
        path = f"{name}.{field_name}" if name else field_name
        if sub is not None:
            nested.append((sub[0], path, sub[1]))
            continue
        description = info.description or comments.get(field_name, "")
        keys.append(Key(field_name, _type(info), _default(info), description))
    out.append(Section(name, array, _docstring(model, top=not name), tuple(keys)))
    for sub_model, path, sub_array in nested:
        _walk(sub_model, path, sub_array, out)


def _docstring(model: type[BaseModel], *, top: bool) -> str:
    if top:
        return (
            "Settings outside any table. Every key has a default; a config file names only "
            "what it changes. Paths are relative to the config file's directory."
        )
    doc = model.__doc__ or ""
    if doc.startswith(("Usage docs", "A base class")):  # pydantic's own, not ours
        return ""
    return " ".join(inspect.cleandoc(doc).split())


# -- types ---------------------------------------------------------------------------


def _type(info: FieldInfo) -> str:
    text = _type_name(info.annotation)
    limits = []
    for meta in info.metadata:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            value = getattr(meta, attr, None)
            if isinstance(meta, annotated_types.BaseMetadata) and value is not None:
                limits.append(f"{sign} {_number(value)}")
    return f"{text} ({', '.join(limits)})" if limits else text


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return " | ".join(f'"{a}"' if isinstance(a, str) else str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        parts = [a for a in args if a is not type(None)]
        name = " | ".join(_type_name(a) for a in parts)
        return f"{name} (optional)" if len(parts) < len(args) else name
    if origin is tuple:
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return f"table of {_type_name(args[1])}"
    simple = {str: "string", int: "integer", float: "number", bool: "boolean", Path: "path"}
    if annotation in simple:
        return simple[annotation]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "table"
    return getattr(annotation, "__name__", str(annotation))


def _number(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _default(info: FieldInfo) -> str:
    if info.default_factory is not None:
        value = info.default_factory()  # type: ignore[call-arg]
    elif info.default is PydanticUndefined:
        return "required"
    else:
        value = info.default
    return _toml(value)


def _toml(value: object) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, Path):
        return f'"{value}"'
    if isinstance(value, float):
        return _number(value)
    if isinstance(value, (tuple, list)):
        if not value:
            return "[]"
        if all(isinstance(v, BaseModel) for v in value):
            return "[" + ", ".join(_inline(v) for v in value) + "]"
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return (
            "{}"
            if not value
            else "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
        )
    return str(value)


def _inline(model: BaseModel) -> str:
    fields = type(model).model_fields
    shown = {
        k: v
        for k, v in model.model_dump().items()
        if fields[k].is_required() or v != fields[k].default
    }
    return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in shown.items()) + "}"


# -- comments in the model's source ---------------------------------------------------


@cache
def _field_comments(model: type[BaseModel]) -> dict[str, str]:
    """Field name -> the comments above it (a contiguous block) and on its lines."""
    try:
        source = textwrap.dedent(inspect.getsource(model))
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    inline: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            row, col = token.start
            if lines[row - 1][:col].strip():  # after code on the same line
                inline[row] = token.string
    class_node = ast.parse(source).body[0]
    assert isinstance(class_node, ast.ClassDef)
    found: dict[str, str] = {}
    for node in class_node.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above: list[str] = []
        row = node.lineno - 1  # 1-based line of the field; walk up from the line before
        while row >= 1 and lines[row - 1].strip().startswith("#"):
            above.insert(0, lines[row - 1].strip())
            row -= 1
        last = node.end_lineno or node.lineno
        beside = [inline[r] for r in range(node.lineno, last + 1) if r in inline]
        text = " ".join(_comment_text(c) for c in above + beside)
        found[node.target.id] = " ".join(text.split())
    return found


def _comment_text(comment: str) -> str:
    text = comment.lstrip("#").strip()
    for marker in ("fmt: skip", "noqa", "type: ignore"):
        if text.startswith(marker):
            return ""
    return text


# -- rendering -------------------------------------------------------------------------

GENERATED = "generated from the config model by `postillon docs` (scripts/gen-docs.py); do not edit"


def markdown() -> str:
    out = [
        "# Configuration reference",
        "",
        f"<!-- {GENERATED} -->",
        "",
        "postillon reads one TOML file: `--config FILE`, else `$POSTILLON_CONFIG`, else "
        "`/etc/postillon/postillon.toml`. `postillon check-config` validates it; every "
        "error names the file and the key. This page lists every key with its type, "
        "default and meaning, generated from the configuration model itself. A reload "
        "(`postillon reload`, SIGHUP) applies most settings; the listen addresses, "
        "`data_dir`, `user`, the queue store, `[admin]` and the ACME account settings "
        "need a restart (the reload names them).",
        "",
        "Sections: " + ", ".join(f"[`{s.header}`](#{_anchor(s)})" for s in reference()),
        "",
    ]
    for section in reference():
        out += [f"## {section.header}", ""]
        if section.description:
            out += [section.description, ""]
        if not section.keys:
            continue
        out += ["| Key | Type | Default | Description |", "|---|---|---|---|"]
        for key in section.keys:
            cells = (f"`{key.name}`", key.type, f"`{key.default}`", key.description)
            out.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        out.append("")
    return "\n".join(out)


def _anchor(section: Section) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to dashes."""
    text = section.header.lower()
    return "".join(c for c in text if c.isalnum() or c in " -_").replace(" ", "-")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def roff(text: str) -> str:
    """Text for a roff line: backslashes doubled, a leading . or ' made literal."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    # Non-ASCII as groff's Unicode escapes: man pages are read without preconv.
    text = "".join(c if ord(c) < 128 else f"\\[u{ord(c):04X}]" for c in text)
    return "\\&" + text if text.startswith((".", "'")) else text


def man5(version: str) -> str:
    out = [
        f'.\\" {GENERATED}',
        f'.TH POSTILLON.TOML 5 "" "postillon {version}" "File Formats"',
        ".SH NAME",
        "postillon.toml \\- configuration file of the postillon mail transfer agent",
        ".SH DESCRIPTION",
        roff(
            "postillon reads one TOML file: --config FILE, else $POSTILLON_CONFIG, else "
            "/etc/postillon/postillon.toml. postillon check-config validates it; every error "
            "names the file and the key. Each section below lists its keys with their type "
            "and default."
        ),
    ]
    for section in reference():
        out += [".SH " + roff(section.header.upper() if not section.name else section.header)]
        if section.description:
            out += [roff(section.description)]
        for key in section.keys:
            out += [".TP", f"\\fB{roff(key.name)}\\fR = {roff(key.default)}  ({roff(key.type)})"]
            if key.description:
                out.append(roff(key.description))
    out += [
        ".SH FILES",
        ".TP",
        "/etc/postillon/postillon.toml",
        "the default configuration file",
        ".SH SEE ALSO",
        "\\fBpostillon\\fR(8)",
    ]
    return "\n".join(out) + "\n"
