"""``Inbox.retarget``: the rest of a message in progress lands in a buffer given later.

The udp driver uses it for a receive posted after its message began to arrive in a pool
buffer (``tests/backends/test_udp_driver.py`` covers that end to end)."""

from __future__ import annotations

from collectives.transport.events import Event, MessageReceived
from collectives.transport.frames import DataChunk
from collectives.transport.receiving import Inbox

META = b"mm"
BODY = bytes(range(256)) * 4  # 1 KiB, no two neighbouring bytes alike
STREAM = META + BODY


def _chunk(start: int, stop: int, seq: int = 0, channel: int = 3) -> DataChunk:
    return DataChunk(
        channel, 0, 0, seq, 10 + seq, start, len(META), len(BODY), memoryview(STREAM[start:stop])
    )


def _inbox() -> tuple[Inbox, list[Event], list[memoryview]]:
    events: list[Event] = []
    given: list[memoryview] = []

    def allocate(peer: int, channel: int, meta: bytes, body_len: int) -> memoryview:
        given.append(memoryview(bytearray(body_len)))
        return given[-1]

    return Inbox(1, allocate, events.append), events, given


def test_the_rest_lands_in_the_new_buffer_and_what_came_is_copied() -> None:
    inbox, events, given = _inbox()
    inbox.on_chunk(_chunk(0, 300))
    inbox.on_chunk(_chunk(700, len(STREAM)))  # out of order: a hole at 300..700
    target = memoryview(bytearray(len(BODY)))
    assert inbox.retarget(3, target)
    inbox.on_chunk(_chunk(300, 700))
    (event,) = events
    assert isinstance(event, MessageReceived)
    assert event.body is target and bytes(target) == BODY
    # The allocation's buffer got nothing once the message moved.
    first = given[0]
    assert bytes(first[298:698]) == bytes(400)
    assert inbox.released == len(STREAM)


def test_nothing_to_retarget_changes_nothing() -> None:
    inbox, events, given = _inbox()
    target = memoryview(bytearray(len(BODY)))
    assert not inbox.retarget(3, target)  # no channel yet
    inbox.on_chunk(_chunk(len(META) + 10, 200))  # bytes before their meta: not allocated yet
    assert not inbox.retarget(3, target)
    inbox.on_chunk(_chunk(0, len(META) + 10))
    assert not inbox.retarget(3, memoryview(bytearray(len(BODY) - 1)))  # another size
    assert not inbox.retarget(4, target)  # another channel
    inbox.on_chunk(_chunk(200, len(STREAM)))
    (event,) = events
    assert isinstance(event, MessageReceived)
    assert event.body is given[0] and bytes(given[0]) == BODY
    assert bytes(target) == bytes(len(BODY))


def test_only_the_next_message_to_deliver_moves() -> None:
    inbox, events, given = _inbox()
    inbox.on_chunk(_chunk(0, 100, seq=0))
    inbox.on_chunk(_chunk(0, 100, seq=1))
    target = memoryview(bytearray(len(BODY)))
    assert inbox.retarget(3, target)  # message 0, not 1
    inbox.on_chunk(_chunk(100, len(STREAM), seq=1))
    inbox.on_chunk(_chunk(100, len(STREAM), seq=0))
    assert [e.body is target for e in events if isinstance(e, MessageReceived)] == [True, False]
    assert bytes(target) == BODY and bytes(given[1]) == BODY
