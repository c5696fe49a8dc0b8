"""The Postfix policy delegation protocol (protocol/policy_delegation.py), sans-IO:
requests, responses fed whole, byte by byte and with trailing bytes, limits, actions."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postillon.core.reply import Reply
from postillon.protocol.policy_delegation import (
    MAX_LINE,
    PolicyProtocolError,
    ResponseReader,
    encode_request,
    parse_action,
)


def test_request_is_name_value_lines_and_a_blank_line() -> None:
    data = encode_request({"request": "smtpd_access_policy", "helo_name": "a.example"})
    assert data == b"request=smtpd_access_policy\nhelo_name=a.example\n\n"


def test_a_value_cannot_inject_attributes() -> None:
    data = encode_request({"helo_name": "x\nrecipient=evil@example\n\n"})
    assert data.count(b"\n") == 2 and b"\nrecipient=" not in data
    with pytest.raises(ValueError):
        encode_request({"bad name": "x"})


ANSWER = b"action=DEFER_IF_PERMIT Greylisted, see http://example/\nextra=1\n\n"


@pytest.mark.parametrize("split", ["whole", "bytes"])
def test_response_whole_and_byte_by_byte(split: str) -> None:
    reader = ResponseReader()
    pieces = [ANSWER] if split == "whole" else [ANSWER[i : i + 1] for i in range(len(ANSWER))]
    for piece in pieces[:-1]:
        reader.receive_data(piece)
        assert reader.next_response() is None
    reader.receive_data(pieces[-1])
    response = reader.next_response()
    assert response is not None
    assert response.action == "DEFER_IF_PERMIT Greylisted, see http://example/"
    assert response.attributes["extra"] == "1"
    assert not reader.pending


def test_trailing_bytes_wait_for_the_next_response_and_crlf_is_fine() -> None:
    reader = ResponseReader()
    reader.receive_data(b"action=DUNNO\r\n\r\naction=OK\n")
    first = reader.next_response()
    assert first is not None and first.action == "DUNNO"
    assert reader.next_response() is None and reader.pending
    reader.receive_data(b"\n")
    second = reader.next_response()
    assert second is not None and second.action == "OK"


@pytest.mark.parametrize(
    "data",
    [
        b"no equals sign\n\n",
        b"other=1\n\n",  # no action=
        b"action=" + b"x" * (MAX_LINE + 10),  # an endless line
        b"".join(b"a%d=1\n" % i for i in range(200)),  # endless attributes
    ],
)
def test_garbage_is_a_protocol_error(data: bytes) -> None:
    with pytest.raises(PolicyProtocolError):
        ResponseReader().receive_data(data)


@pytest.mark.parametrize(
    ("action", "kind", "reply"),
    [
        ("DUNNO", "dunno", None),
        ("dunno", "dunno", None),
        ("OK", "ok", None),
        ("REJECT", "reply", Reply.of(554, "5.7.1", "Access denied")),
        ("REJECT go away", "reply", Reply.of(554, "5.7.1", "go away")),
        ("DEFER_IF_PERMIT Greylisted", "reply", Reply.of(450, "4.7.1", "Greylisted")),
        ("DEFER", "reply", Reply.of(450, "4.7.1", "Try again later")),
        ("450 4.2.0 later please", "reply", Reply.of(450, "4.2.0", "later please")),
        ("550 no such user", "reply", Reply.of(550, "5.7.1", "no such user")),
        ("421 5.0.0 mismatched class", "reply", Reply.of(421, "4.7.1", "5.0.0 mismatched class")),
        ("PREPEND X-Greylist: delayed 3 seconds", "prepend", None),
        ("PREPEND not a header", "unsupported", None),
        ("DISCARD spam", "discard", None),
        ("HOLD look at it", "hold", None),
        ("WARN odd", "warn", None),
        ("REDIRECT x@example", "unsupported", None),
        ("DEFER_IF_REJECT x", "unsupported", None),
        ("4500 nope", "unsupported", None),
        ("250 fine", "unsupported", None),
    ],
)
def test_actions(action: str, kind: str, reply: Reply | None) -> None:
    parsed = parse_action(action)
    assert parsed.kind == kind
    assert parsed.reply == reply
    if kind == "prepend":
        assert parsed.text == "X-Greylist: delayed 3 seconds"


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=600), cuts=st.lists(st.integers(0, 600), max_size=8))
def test_any_bytes_give_responses_or_a_protocol_error_in_any_chunking(
    data: bytes, cuts: list[int]
) -> None:
    """Whatever a policy server sends: responses or PolicyProtocolError, never another
    exception, and the same outcome however the bytes are split."""

    def run(pieces: list[bytes]) -> tuple[str, list[str]]:
        reader = ResponseReader()
        actions: list[str] = []
        try:
            for piece in pieces:
                reader.receive_data(piece)
                while (response := reader.next_response()) is not None:
                    actions.append(response.action)
        except PolicyProtocolError:
            return "error", actions
        return "ok", actions

    bounds = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    pieces = [data[a:b] for a, b in itertools.pairwise(bounds)]
    whole = run([data])
    split = run(pieces)
    assert whole[0] == split[0]
    if whole[0] == "ok":
        assert whole[1] == split[1]
    for action in whole[1]:
        parse_action(action)  # never raises
