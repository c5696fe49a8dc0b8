"""The retry curve: when to try a deferred recipient again, and when to give up.

Pure: no clock, no store, no I/O. The runner passes ``now`` and (in tests) a
seeded ``random.Random``; the store only keeps the ``next_try`` it is given
(DESIGN principle 5, "storage is not scheduling").

The defaults follow Postfix: the first retry about five minutes after the
first failure (``minimal_backoff_time = 300s``), doubling up to about an hour
(``maximal_backoff_time``, 4000 s in Postfix, a round hour here), and a bounce
after five days in the queue (``maximal_queue_lifetime = 5d``).

Unlike Postfix the delay carries *jitter*: after an outage every message
deferred at the same moment would otherwise come back at the same moment and
hit the recovering peer together (a retry storm). The jitter is subtractive:
the delay is drawn uniformly from ``[base * (1 - jitter), base]``, so the
spread never vanishes and ``max_delay`` is a true cap.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

_DEFAULT_RNG = random.Random()


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    first_delay: float = 300.0  # seconds after the first failed attempt
    max_delay: float = 3600.0  # cap of the delay between two attempts
    backoff: float = 2.0  # the delay grows by this factor per attempt
    jitter: float = 0.2  # fraction of the delay drawn at random (0 = none)
    max_lifetime: float = 5 * 86400.0  # bounce after this long in the queue

    def __post_init__(self) -> None:
        if not self.first_delay > 0:
            raise ValueError("first_delay must be positive")
        if not self.max_delay >= self.first_delay:
            raise ValueError("max_delay must be at least first_delay")
        if not self.backoff >= 1.0:
            raise ValueError("backoff must be at least 1")
        if not 0.0 <= self.jitter < 1.0:
            raise ValueError("jitter must be in [0, 1)")
        if not self.max_lifetime > 0:
            raise ValueError("max_lifetime must be positive")

    def base_delay(self, attempts: int) -> float:
        """The delay before jitter after ``attempts`` failed attempts (>= 1; 0 counts as 1)."""
        if attempts < 0:
            raise ValueError("attempts must not be negative")
        steps = max(attempts, 1) - 1
        if steps == 0 or self.backoff == 1.0:
            return min(self.first_delay, self.max_delay)
        # Compare exponents instead of computing backoff**steps, which overflows
        # a float for a record that has failed a few thousand times.
        if steps >= math.log(self.max_delay / self.first_delay) / math.log(self.backoff):
            return self.max_delay
        return min(self.first_delay * self.backoff**steps, self.max_delay)

    def next_try(self, attempts: int, now: float, rng: random.Random | None = None) -> float:
        """When to try again after ``attempts`` failed attempts, the last one at ``now``.

        ``rng`` draws the jitter; ``None`` uses a process-wide generator (pass
        a seeded ``random.Random`` in tests).
        """
        base = self.base_delay(attempts)
        if self.jitter == 0.0:
            return now + base
        u = (rng if rng is not None else _DEFAULT_RNG).random()  # in [0, 1)
        return now + base * (1.0 - self.jitter * u)

    def expired(self, received_at: float, now: float) -> bool:
        """True once a message has been queued for ``max_lifetime``: stop retrying, bounce."""
        return now - received_at >= self.max_lifetime
