"""No module under src/ is longer than 600 lines (the project's code standard: small
modules with one responsibility each). Three files crossed it unnoticed when several
branches merged; this makes the next one fail here instead."""

from __future__ import annotations

from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "postillon"
LIMIT = 600


def test_no_module_over_the_limit() -> None:
    too_long = {
        str(path.relative_to(SRC)): count
        for path in sorted(SRC.rglob("*.py"))
        if (count := len(path.read_text(encoding="utf-8").splitlines())) > LIMIT
    }
    assert too_long == {}, f"split these modules (limit {LIMIT} lines): {too_long}"
