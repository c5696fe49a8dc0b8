"""The benches built on ``accept_bench.Bench`` start: their own options plus what
``Bench`` reads. ``maildir_bench.py`` and ``big_bench.py`` once failed at start with
an AttributeError when ``Bench`` learned a new option (chasquid); CI runs no bench."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.mark.parametrize(
    ("module", "cls"),
    [("accept_bench", "Bench"), ("maildir_bench", "MaildirBench"), ("big_bench", "BigBench")],
)
def test_bench_builds_from_its_default_options(
    module: str, cls: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setattr(sys, "argv", [f"{module}.py"])
    mod = importlib.import_module(module)
    bench = getattr(mod, cls)(mod.parse_args())
    assert bench.out.name  # built without touching the disk or starting anything
