"""The state table in protocol/_state.py: complete, consistent, every state reachable."""

from __future__ import annotations

import pytest

from postillon.protocol import replies as R
from postillon.protocol._state import (
    ADMISSIBLE,
    READS_COMMANDS,
    REFUSAL,
    TRANSITIONS,
    Command,
    State,
    Trigger,
    check,
    transition,
)
from postillon.protocol.errors import ProtocolError


def test_every_command_state_pair_is_decided_explicitly() -> None:
    assert set(ADMISSIBLE) == set(Command)
    for command in Command:
        for state in READS_COMMANDS:
            admissible = state in ADMISSIBLE[command]
            refused = (command, state) in REFUSAL
            assert admissible != refused, (command, state)


def test_refusals_are_sequence_errors() -> None:
    for reply in REFUSAL.values():
        assert reply.code in (503, 554), reply
        assert reply.status == "5.5.1"


def test_every_state_is_reachable() -> None:
    seen = {State.CONNECTED}
    frontier = [State.CONNECTED]
    while frontier:
        state = frontier.pop()
        for (src, _trigger), dst in TRANSITIONS.items():
            if src is state and dst not in seen:
                seen.add(dst)
                frontier.append(dst)
        seen.add(transition(state, Trigger.CLOSE))
    assert seen == set(State)


def test_unknown_transition_is_a_bug() -> None:
    with pytest.raises(RuntimeError):
        transition(State.GREETED, Trigger.MAIL_ACCEPTED)
    with pytest.raises(RuntimeError):
        transition(State.CLOSED, Trigger.RESET)
    assert transition(State.DATA, Trigger.CLOSE) is State.CLOSED


@pytest.mark.parametrize(
    ("command", "state", "reply"),
    [
        (Command.MAIL, State.GREETED, R.NEED_HELLO),
        (Command.MAIL, State.RCPT, R.NESTED_MAIL),
        (Command.RCPT, State.READY, R.NEED_MAIL),
        (Command.DATA, State.MAIL, R.NO_VALID_RECIPIENTS),
        (Command.DATA, State.BDAT, R.DATA_AFTER_BDAT),
        (Command.STARTTLS, State.MAIL, R.IN_TRANSACTION),
        (Command.MAIL, State.DATA, R.BAD_SEQUENCE),  # not a command state: the default
    ],
)
def test_check(command: Command, state: State, reply: object) -> None:
    with pytest.raises(ProtocolError) as info:
        check(command, state)
    assert info.value.reply == reply


def test_check_admits() -> None:
    check(Command.HELLO, State.BDAT)
    check(Command.BDAT, State.BDAT)
    check(Command.DATA, State.RCPT)
