"""The generated docs (docs/configuration.md, docs/man/postillon.8, docs/man/postillon.toml.5)
are what the code generates today: a config key or command option added without
regenerating fails here. Fix: `postillon docs --write docs` (or scripts/gen-docs.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from postillon.cli.docgen import _model_of, reference
from postillon.cli.docs_cmd import NAMES, generate
from postillon.cli.main import _parser
from postillon.cli.mangen import _subparsers
from postillon.config.model import Config

DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.mark.parametrize("name", NAMES)
def test_committed_file_is_what_the_code_generates(name: str) -> None:
    committed = (DOCS / name).read_text() if (DOCS / name).exists() else "(missing)"
    assert committed == generate(_parser())[name], (
        f"docs/{name} is out of date: run `postillon docs --write docs` and commit it"
    )


def _keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    found = []
    for name, info in model.model_fields.items():
        sub = _model_of(info.annotation)
        path = f"{prefix}{name}"
        found += _keys(sub[0], path + ".") if sub else [path]
    return found


def test_every_key_is_documented_with_a_description() -> None:
    documented = {(f"{s.name}." if s.name else "") + k.name: k for s in reference() for k in s.keys}
    assert set(documented) == set(_keys(Config))
    assert "tls.acme" in documented and "tls.acme_directory" in documented
    undescribed = sorted(k for k, key in documented.items() if not key.description)
    assert undescribed == [], "add a Field(description=...) or a comment beside these keys"
    markdown = generate(_parser())["configuration.md"]
    assert "| `acme_http_listen` | string (optional) | `unset` |" in markdown


def test_every_command_is_in_the_man_page() -> None:
    page = generate(_parser())["man/postillon.8"]

    def walk(parser: object, path: str) -> None:
        for name, _, sub in _subparsers(parser):  # type: ignore[arg-type]
            full = f"{path} {name}"
            assert f'.SS "{full.replace("-", chr(92) + "-")}"' in page, full
            walk(sub, full)

    walk(_parser(), "postillon")
    assert '.SS "postillon tls renew"' in page


def test_check_command_reports_a_stale_file(tmp_path: Path) -> None:
    run = [sys.executable, "-m", "postillon.cli.main", "docs"]
    subprocess.run([*run, "--write", str(tmp_path)], check=True, capture_output=True)
    ok = subprocess.run([*run, "--check", str(tmp_path)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    (tmp_path / "man" / "postillon.8").write_text("old\n")
    stale = subprocess.run([*run, "--check", str(tmp_path)], capture_output=True, text=True)
    assert stale.returncode == 1 and "postillon.8: out of date" in stale.stderr
