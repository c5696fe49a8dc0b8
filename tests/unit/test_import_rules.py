"""DESIGN.md's "may import" table, kept as data and enforced by an AST walk.

Each room (a package or top-level module under ``src/postillon/``) names the modules it may
import, as dotted prefixes below ``postillon.``: ``"queue.store"`` allows the store protocol and
nothing else of ``queue``; ``"dns"`` allows the whole room. Every room may also import the rooms
in ``EVERYONE`` (DESIGN: core, the mail log and metrics, and config's model types). Changing the
design means changing ``MAY_IMPORT`` and DESIGN.md's table together.

Three checks:
1. every ``import postillon.X`` / ``from postillon.X import`` in a room is allowed by its row;
2. no two rooms import each other (a room never imports a room that imports it);
3. no file-level import cycle (imports under ``if TYPE_CHECKING:`` count: a cycle for the type
   checker is still a knot for the reader).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "postillon"

EVERYONE = ("core", "observability", "config.model", "osutil")
ANYTHING = ("*",)

MAY_IMPORT: dict[str, tuple[str, ...]] = {
    "core": (),
    "osutil": (),
    "protocol": (),
    "config": (),
    "dns": (),
    "dkimcore": (),
    "signing": ("dkimcore",),
    "observability": (),
    "queue": (),
    # checks: the relay policy asks the local recipient table; DKIM goes to a helper
    # process through the pool (helpers sits below checks and intake). The port-25
    # checks take their settings from config.inbound_filters (config model types split
    # from config.model, which is at its size limit).
    "checks": (
        "protocol",
        "dns.resolver",
        "dkimcore",
        "queue.store",
        "routing.local",
        "helpers.pool",
        "config.inbound_filters",
    ),
    "intake": ("checks", "signing", "queue.store", "helpers.pool"),
    "routing": ("dns.resolver",),
    "delivery": ("queue.store", "routing", "dsn"),
    # outbound and local take the route's values (routing.router's NextHop and Route, the
    # local recipient table that maps an address to its mailbox) with the job; outbound
    # fetches MTA-STS policies with the fetch dns check uses (dns.sts_fetch).
    "outbound": (
        "protocol",
        "dns.resolver",
        "dns.sts_fetch",
        "delivery.transport",
        "routing.router",
        # shaping keeps suspensions and rate buckets in the store's tables
        "queue.shaping_state",
    ),
    "local": ("protocol", "delivery.transport", "routing.local"),
    "dsn": ("intake", "queue.store"),
    "inbound": ("protocol", "checks", "intake"),
    "helpers": ("dkimcore", "signing"),
    # dnsrecords: the MTA-STS parser is core.sts, its fetch dns.sts_fetch (shared with outbound).
    "dnsrecords": ("dns.resolver", "dns.sts_fetch", "config", "signing"),
    # tlsrpt (RFC 8460): observes outbound sessions (the observer's value type), keeps
    # counters in the store, looks up _smtp._tls TXT, and mails reports through intake.
    "tlsrpt": ("dns.resolver", "dns.sts_fetch", "queue.store", "intake", "outbound.tls_observer"),
    # ACME certificates: the renewal lease and the shared certificate live in the store.
    "certs": ("queue.store",),
    # dmarcrpt (RFC 7489 §7.2): keeps counters in the store, reads rua= with the DMARC
    # record parser, looks up _dmarc and the §7.1 verification TXT, mails through intake.
    "dmarcrpt": ("dns.resolver", "queue.store", "intake", "checks.dmarc_check"),
    "admin": ANYTHING,
    # provision (`postillon setup`, the unit file): checks the config it writes, makes
    # DKIM keys and the first mail account, prints the DNS records to publish.
    "provision": ("config", "signing", "inbound.accounts", "dnsrecords", "paths"),
    # postfiximport (`postillon import-postfix`): reads Postfix files, writes TOML text.
    "postfiximport": (),
    "app": ANYTHING,
    "serve": ANYTHING,  # `postillon serve`: runs the App (composition root, split from app.py)
    "reload": ANYTHING,
    "build": ANYTHING,
    "acme_service": ANYTHING,  # composition root: the ACME pieces of a running server
    "paths": ("config",),
    "cli": ANYTHING,
    "testing": ANYTHING,
    "worker_thread": (),
}


def _room_of(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _module_of(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module below ``postillon.``) for every absolute import of postillon in a file."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
            # ``from postillon.queue import store`` imports the module ``queue.store``.
            if node.module.count(".") == 1:
                names = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found += [
            (node.lineno, n.removeprefix("postillon.")) for n in names if n.startswith("postillon.")
        ]
    return found


FILES = sorted(p for p in SRC.rglob("*.py"))
IMPORTS = {path: _imports(path) for path in FILES}


def _allowed(room: str, module: str) -> bool:
    target_room = module.split(".")[0]
    if target_room == room:
        return True
    rules = MAY_IMPORT[room] + EVERYONE
    if rules[0] == "*":
        return True
    return any(module == rule or module.startswith(rule + ".") for rule in rules)


def test_every_room_is_in_the_table() -> None:
    rooms = {_room_of(path) for path in FILES} - {"__init__"}
    assert rooms <= set(MAY_IMPORT), f"rooms missing from MAY_IMPORT: {rooms - set(MAY_IMPORT)}"


@pytest.mark.parametrize("room", sorted(MAY_IMPORT))
def test_room_imports_only_what_design_allows(room: str) -> None:
    broken = [
        f"{path.relative_to(SRC)}:{line}: imports postillon.{module}"
        for path, found in IMPORTS.items()
        if _room_of(path) == room
        for line, module in found
        if not _allowed(room, module)
    ]
    assert not broken, f"{room} may import {MAY_IMPORT[room] + EVERYONE}:\n" + "\n".join(broken)


def test_no_two_rooms_import_each_other() -> None:
    edges: dict[str, set[str]] = defaultdict(set)
    for path, found in IMPORTS.items():
        for _, module in found:
            target = module.split(".")[0]
            if target != _room_of(path):
                edges[_room_of(path)].add(target)
    mutual = sorted(
        {tuple(sorted((a, b))) for a in list(edges) for b in edges[a] if a in edges.get(b, ())}
    )
    assert not mutual, f"rooms importing each other: {mutual}"


def test_no_file_level_import_cycle() -> None:
    modules = {_module_of(path): path for path in FILES}

    def target_file(module: str) -> str | None:
        while module and module not in modules:  # ``from x.y import Name`` -> x.y
            module = module.rpartition(".")[0]
        return module or None

    graph = {
        name: {t for _, m in IMPORTS[path] if (t := target_file(m)) and t != name}
        for name, path in modules.items()
    }
    # A package's __init__ importing its own submodules is not a cycle worth reporting.
    cycles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_core_uses_the_standard_library_and_idna_only() -> None:
    """DESIGN: core is stdlib only, plus ``idna`` for IDNA 2008 (the stdlib codec is IDNA 2003)."""
    import sys

    allowed = set(sys.stdlib_module_names) | {"postillon", "idna"}
    broken = []
    for path in FILES:
        if _room_of(path) != "core":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                tops = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                tops = [node.module.split(".")[0]]
            else:
                continue
            broken += [f"{path.relative_to(SRC)}: {t}" for t in tops if t not in allowed]
    assert not broken, broken
