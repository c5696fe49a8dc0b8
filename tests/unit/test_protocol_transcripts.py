"""Every tests/transcripts/*.smtp dialogue against ServerConnection in memory.

Each transcript runs three ways (h11 ``tr()`` idea): every client payload in
one piece, byte by byte, and in 7-octet pieces. The server's replies and the
events must match the transcript every time.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from postillon.protocol.events import BodyData, Event, MessageAborted
from postillon.testing.transcript import load_transcript, run_in_memory

TRANSCRIPTS = sorted((Path(__file__).parent.parent / "transcripts").glob("*.smtp"))


def _normalised(events: list[Event]) -> list[object]:
    """Events with consecutive BodyData merged (their split follows the packets)."""
    out: list[object] = []
    for event in events:
        if isinstance(event, BodyData) and out and isinstance(out[-1], bytes):
            out[-1] += event.data
        elif isinstance(event, BodyData):
            out.append(event.data)
        else:
            out.append(event)
    # How much content was passed on before a refusal depends on where the
    # fault fell in the packets; the adapter discards it anyway.
    return [
        item
        for i, item in enumerate(out)
        if not (
            isinstance(item, bytes) and i + 1 < len(out) and isinstance(out[i + 1], MessageAborted)
        )
    ]


def test_transcripts_exist() -> None:
    assert len(TRANSCRIPTS) >= 40


@pytest.mark.parametrize("path", TRANSCRIPTS, ids=lambda p: p.stem)
def test_transcript(path: Path) -> None:
    transcript = load_transcript(path)
    assert transcript.purpose, "the first line must say why the transcript exists"
    whole = run_in_memory(transcript)
    bytewise = run_in_memory(transcript, chunk_size=1)
    sevens = run_in_memory(transcript, chunk_size=7)
    assert bytewise.output == whole.output
    assert sevens.output == whole.output
    assert _normalised(bytewise.events) == _normalised(whole.events)
    assert _normalised(sevens.events) == _normalised(whole.events)
