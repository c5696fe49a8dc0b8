"""aliases(5) parsing: entries, continuation lines, comments, warnings, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from postillon.routing.aliases import (
    AliasesError,
    AliasTable,
    AliasTarget,
    UnsupportedTarget,
    load_aliases,
    merge_aliases,
    normalize_alias_map,
    parse_aliases,
    parse_target,
)

PARSE_CASES: list[tuple[str, str, dict[str, tuple[str, ...]]]] = [
    ("empty", "", {}),
    ("one entry", "root: alice\n", {"root": ("alice",)}),
    ("several targets", "staff: alice, bob,carol\n", {"staff": ("alice", "bob", "carol")}),
    ("name lower-cased", "Root: Alice\n", {"root": ("Alice",)}),
    ("remote target keeps local case", "r: Bob@Remote.TEST\n", {"r": ("Bob@remote.test",)}),
    ("angle brackets removed", "r: <bob@remote.test>\n", {"r": ("bob@remote.test",)}),
    ("space before colon", "root : alice\n", {"root": ("alice",)}),
    ("no space after colon", "root:alice\n", {"root": ("alice",)}),
    ("comment lines", "# header\nroot: alice\n# trailer\n", {"root": ("alice",)}),
    ("indented comment", "root: alice,\n  # who else?\n  bob\n", {"root": ("alice", "bob")}),
    ("blank lines", "\n\nroot: alice\n\n\nbob: carol\n", {"root": ("alice",), "bob": ("carol",)}),
    ("continuation with space", "staff: alice,\n  bob\n", {"staff": ("alice", "bob")}),
    ("continuation with tab", "staff: alice\n\t, bob\n", {"staff": ("alice", "bob")}),
    (
        "continuation over several lines",
        "staff:\n  alice,\n  bob,\n  carol\nnext: dave\n",
        {"staff": ("alice", "bob", "carol"), "next": ("dave",)},
    ),
    ("trailing comma", "staff: alice, bob,\n", {"staff": ("alice", "bob")}),
    ("duplicate target once", "staff: alice, alice\n", {"staff": ("alice",)}),
    ("CRLF file", "root: alice\r\nbob: carol\r\n", {"root": ("alice",), "bob": ("carol",)}),
    ("no final newline", "root: alice", {"root": ("alice",)}),
    ("quoted name", '"Sales Team": carol\n', {"sales team": ("carol",)}),
    ("quoted name with colon", '"a:b": carol\n', {"a:b": ("carol",)}),
    ("quoted target local part", 'x: "j doe"@example.org\n', {"x": ('"j doe"@example.org',)}),
    ("quoted comma inside target", 'x: "a,b"@example.org, c\n', {"x": ('"a,b"@example.org', "c")}),
    ("backslash target", "root: \\root, alice\n", {"root": ("\\root", "alice")}),
    (
        "utf-8 name and target",
        "jörg: jürgen@bücher.example\n",
        {"jörg": ("jürgen@bücher.example",)},
    ),
]


@pytest.mark.parametrize(
    ("text", "expected"), [c[1:] for c in PARSE_CASES], ids=[c[0] for c in PARSE_CASES]
)
def test_parse(text: str, expected: dict[str, tuple[str, ...]]) -> None:
    table = parse_aliases(text, source="aliases")
    assert dict(table) == expected
    assert table.warnings == ()


WARNING_CASES: list[tuple[str, str, dict[str, tuple[str, ...]], list[str]]] = [
    (
        "pipe",
        "root: alice\nvac: |/usr/bin/vacation bob, bob\n",
        {"root": ("alice",), "vac": ("bob",)},
        ["aliases:2: alias 'vac': pipe target '|/usr/bin/vacation bob' is not supported; ignored"],
    ),
    (
        "quoted pipe",
        'vac: "|/usr/bin/vacation bob", bob\n',
        {"vac": ("bob",)},
        [
            "aliases:1: alias 'vac': pipe target '\"|/usr/bin/vacation bob\"' is not supported;"
            " ignored"
        ],
    ),
    (
        "file",
        "log: alice,\n  /var/log/mail.copy\n",
        {"log": ("alice",)},
        ["aliases:2: alias 'log': file target '/var/log/mail.copy' is not supported; ignored"],
    ),
    (
        "include, any case",
        "list: :INCLUDE:/etc/mail/list\n",
        {"list": ()},
        [
            "aliases:1: alias 'list': include target ':INCLUDE:/etc/mail/list' is not supported;"
            " ignored",
            "aliases:1: alias 'list' has no deliverable target",
        ],
    ),
    (
        "nothing left",
        "nobody: /dev/null\n",
        {"nobody": ()},
        [
            "aliases:1: alias 'nobody': file target '/dev/null' is not supported; ignored",
            "aliases:1: alias 'nobody' has no deliverable target",
        ],
    ),
    (
        "duplicate keeps the first",
        "root: alice\n\nROOT: bob\n",
        {"root": ("alice",)},
        ["aliases:3: duplicate alias 'root' (first at line 1); ignored"],
    ),
    (
        "name with domain",
        "alice@example.org: bob\n",
        {},
        [
            "aliases:1: alias name 'alice@example.org' has a domain;"
            " aliases(5) names are local parts; ignored"
        ],
    ),
]


@pytest.mark.parametrize(
    ("text", "expected", "warnings"),
    [c[1:] for c in WARNING_CASES],
    ids=[c[0] for c in WARNING_CASES],
)
def test_unsupported_and_odd_entries_warn(
    text: str, expected: dict[str, tuple[str, ...]], warnings: list[str]
) -> None:
    table = parse_aliases(text, source="aliases")
    assert dict(table) == expected
    assert [str(w) for w in table.warnings] == warnings


ERROR_CASES: list[tuple[str, str, int, str]] = [
    ("no colon", "root alice\n", 1, "expected 'name: target, ...'"),
    ("no colon on line 3", "a: b\n# c\nroot alice\n", 3, "expected 'name: target, ...'"),
    ("continuation first", "  alice\nroot: bob\n", 1, "continuation line without an entry"),
    ("empty name", ": alice\n", 1, "empty alias name"),
    ("name with space", "my root: alice\n", 1, "contains whitespace"),
    ("unterminated quoted name", '"root: alice\n', 1, "unterminated quoted name"),
    ("quoted name without colon", '"root" alice\n', 1, "expected ':' after the quoted name"),
    ("unterminated quote in value", 'a: b,\n  "c\n', 2, "unterminated quoted string"),
    ("missing comma", "a: b c\n", 1, "separate targets with ','"),
    ("missing comma on continuation", "a: b,\n  c\n  d\n", 2, "separate targets with ','"),
    ("bad address", "a: bob@\n", 1, "invalid target 'bob@'"),
    ("bad domain", "a: bob@-x-.org\n", 1, "invalid target"),
    ("bad local part", "a: b..c\n", 1, "invalid target"),
]


@pytest.mark.parametrize(
    ("text", "line", "message"), [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES]
)
def test_errors_name_file_and_line(text: str, line: int, message: str) -> None:
    with pytest.raises(AliasesError) as info:
        parse_aliases(text, source="/etc/aliases")
    assert info.value.source == "/etc/aliases"
    assert info.value.line == line
    assert str(info.value).startswith(f"/etc/aliases:{line}: ")
    assert message in str(info.value)


def test_debian_default_file() -> None:
    text = "# See man 5 aliases for format\npostmaster:    root\n"
    assert dict(parse_aliases(text)) == {"postmaster": ("root",)}


TARGET_CASES: list[tuple[str, AliasTarget]] = [
    ("alice", AliasTarget("alice")),
    ("  alice  ", AliasTarget("alice")),
    ("Alice@Example.ORG", AliasTarget("Alice", "example.org")),
    ("<bob@remote.test>", AliasTarget("bob", "remote.test")),
    ("\\root", AliasTarget("root", "", verbatim=True)),
    ("\\root@example.org", AliasTarget("root", "example.org", verbatim=True)),
    ('"j doe"@example.org', AliasTarget('"j doe"', "example.org")),
    ('"j doe"', AliasTarget('"j doe"')),
    ("alice+tag", AliasTarget("alice+tag")),
]


@pytest.mark.parametrize(("text", "expected"), TARGET_CASES, ids=[c[0] for c in TARGET_CASES])
def test_parse_target(text: str, expected: AliasTarget) -> None:
    assert parse_target(text) == expected
    assert parse_target(str(expected)) == expected  # str() round-trips


@pytest.mark.parametrize("text", ["|cmd", '"|cmd arg"', "/dev/null", '"/x y"', ":include:/l"])
def test_parse_target_unsupported(text: str) -> None:
    with pytest.raises(UnsupportedTarget):
        parse_target(text)


@pytest.mark.parametrize("text", ["", "a b", "@x.org", "a@", "a@b@c", "a..b", "\\"])
def test_parse_target_invalid(text: str) -> None:
    with pytest.raises(ValueError):
        parse_target(text)


def test_load_aliases_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "aliases"
    path.write_text("root: alice\nvac: |/bin/true\n", encoding="utf-8")
    table = load_aliases(path)
    assert isinstance(table, dict)
    assert table == {"root": ("alice",), "vac": ()}
    assert [str(w).split(": ", 1)[0] for w in table.warnings] == [f"{path}:2", f"{path}:2"]


def test_load_aliases_errors(tmp_path: Path) -> None:
    with pytest.raises(AliasesError, match="cannot read aliases file"):
        load_aliases(tmp_path / "missing")
    bad = tmp_path / "latin1"
    bad.write_bytes(b"root: alice\nj\xf6rg: bob\n")
    with pytest.raises(AliasesError) as info:
        load_aliases(bad)
    assert str(info.value) == f"{bad}:2: not valid UTF-8"


def test_app_style_merge_with_dict_update(tmp_path: Path) -> None:
    # app.build_local_recipients does: aliases.update(load_aliases(file)).
    path = tmp_path / "aliases"
    path.write_text("root: alice\n", encoding="utf-8")
    merged: dict[str, tuple[str, ...]] = {}
    merged.update(load_aliases(path))
    assert merged == {"root": ("alice",)}


def test_merge_aliases_precedence_and_warnings(tmp_path: Path) -> None:
    first = tmp_path / "a"
    first.write_text("root: alice\nstaff: alice\n", encoding="utf-8")
    second = tmp_path / "b"
    second.write_text("staff: bob\nops: |/bin/ops\n", encoding="utf-8")
    table = merge_aliases([first, second], {"Root": ["carol"]})
    assert table == {"root": ("carol",), "staff": ("bob",), "ops": ()}
    messages = [str(w) for w in table.warnings]
    assert f"{second}: alias 'staff' overrides the one in {first}" in messages
    assert f"[aliases] map: alias 'root' overrides the one in {first}" in messages
    assert any(m.startswith(f"{second}:2: alias 'ops': pipe target") for m in messages)


def test_normalize_alias_map() -> None:
    table = normalize_alias_map(
        {"Root": ["alice", "|/bin/x"], "x@y": ["a"], '"Sales"': ["b"]}, source="cfg"
    )
    assert table == {"root": ("alice",), "sales": ("b",)}
    assert len(table.warnings) == 2
    with pytest.raises(AliasesError, match="cfg 'bad'"):
        normalize_alias_map({"bad": ["a b"]}, source="cfg")
    with pytest.raises(AliasesError, match="list of addresses"):
        normalize_alias_map({"bad": "alice"}, source="cfg")


def test_alias_table_is_a_plain_mapping() -> None:
    table = AliasTable({"a": ("b",)})
    assert table == {"a": ("b",)}
    assert table.warnings == ()
