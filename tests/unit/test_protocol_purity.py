"""protocol/ stays pure (DESIGN.md principle 1): no I/O, clock, logging or config imports."""

from __future__ import annotations

import ast
from pathlib import Path

import postillon.protocol

ALLOWED_STDLIB = {
    "__future__",
    "abc",
    "collections",
    "collections.abc",
    "dataclasses",
    "enum",
    "re",
    "struct",  # the milter protocol's binary framing (pure: bytes in, bytes out)
    "typing",
}
ALLOWED_PACKAGES = ("postillon.core", "postillon.protocol")


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.name}: use absolute imports"
            names.add(node.module or "")
    return names


def test_protocol_imports_only_pure_modules() -> None:
    root = Path(postillon.protocol.__file__).parent
    files = sorted(root.glob("*.py"))
    assert files
    for path in files:
        for name in _imports(path):
            ok = (
                name in ALLOWED_STDLIB
                or name == "postillon.protocol"
                or name.startswith(tuple(p + "." for p in ALLOWED_PACKAGES))
            )
            assert ok, f"{path.name} imports {name}"
