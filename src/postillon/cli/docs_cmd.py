"""``postillon docs``: write or check the generated documentation.

Three files come from the code itself, so they cannot drift from it:
``configuration.md`` (every config key, from the config model: ``docgen.py``),
``man/postillon.8`` (every command and option, from the argparse definitions:
``mangen.py``) and ``man/postillon.toml.5`` (the config reference as a man page).
``--write DIR`` writes them under DIR (the repository keeps them in ``docs/``);
``--check DIR`` exits 1 naming each file that differs (what the test suite runs);
``--print NAME`` prints one. Needs no configuration file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

NAMES = ("configuration.md", "man/postillon.8", "man/postillon.toml.5")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    d = sub.add_parser(
        "docs",
        help="write or check the generated documentation (config reference, man pages)",
        description="Generate the configuration reference (Markdown and postillon.toml(5)) "
        "from the config model, and postillon(8) from the command definitions. Exit "
        "status with --check: 0 up to date, 1 a file differs or is missing.",
    )
    what = d.add_mutually_exclusive_group(required=True)
    what.add_argument("--write", metavar="DIR", help="write the files under DIR (e.g. docs)")
    what.add_argument("--check", metavar="DIR", help="compare the files under DIR")
    what.add_argument("--print", metavar="NAME", choices=NAMES, help="print one file")


def generate(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Relative path -> content of every generated file; ``parser`` is the ``postillon``
    command's (``cli.main`` passes it: this module never imports its importer)."""
    from postillon import __version__
    from postillon.cli.docgen import man5, markdown
    from postillon.cli.mangen import man8

    return {
        "configuration.md": markdown(),
        "man/postillon.8": man8(parser, __version__),
        "man/postillon.toml.5": man5(__version__),
    }


def stale(directory: Path, parser: argparse.ArgumentParser) -> list[str]:
    """The generated files under ``directory`` that differ from what the code gives."""
    found = []
    for name, text in generate(parser).items():
        try:
            current = (directory / name).read_text()
        except OSError:
            current = None
        if current != text:
            found.append(name)
    return found


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.print:
        sys.stdout.write(generate(parser)[args.print])
        return 0
    if args.check:
        differ = stale(Path(args.check), parser)
        for name in differ:
            print(f"{Path(args.check) / name}: out of date (run: postillon docs --write "
                  f"{args.check})", file=sys.stderr)  # fmt: skip
        return 1 if differ else 0
    directory = Path(args.write)
    for name, text in generate(parser).items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")
    return 0
