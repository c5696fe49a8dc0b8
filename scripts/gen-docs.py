#!/usr/bin/env python3
"""Regenerate docs/configuration.md and docs/man/*: the same as `postillon docs --write docs`.

Run after changing the config model or a command's options; tests/unit/test_generated_docs.py
fails while the committed files differ from what the code generates."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from postillon.cli.main import main  # noqa: E402

sys.exit(main(["docs", "--write", str(Path(__file__).resolve().parents[1] / "docs")]))
