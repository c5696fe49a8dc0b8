"""Domain values shared by every room: addresses, replies, envelopes, outcomes, queue ids.

This package imports the standard library only. Nothing here does I/O; everything is a
value (frozen dataclass) or a pure function, so the protocol cores and the queue can
share them without dragging sockets, clocks or configuration along.
"""
