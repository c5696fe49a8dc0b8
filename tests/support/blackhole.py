"""A loopback address and port that black-holes new connections: a listener
that never accepts, its accept queue filled, so the kernel drops further SYNs
(with tcp_abort_on_overflow = 0, Linux's default) and a connect just stalls,
as towards an IPv6 route that goes nowhere or a firewall that drops.

    with BlackHole("::1", port) as hole:      # connects to [::1]:port now hang
        ...
"""

from __future__ import annotations

import socket
from types import TracebackType

__all__ = ["BlackHole"]


class BlackHole:
    def __init__(self, host: str, port: int = 0) -> None:
        self.host = host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        if family == socket.AF_INET6:  # leave the IPv4 side of the port to someone else
            self._listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, port))
        self._listener.listen(0)
        self.port: int = self._listener.getsockname()[1]
        self._fillers: list[socket.socket] = []
        for _ in range(16):  # fill the accept queue until a connect stalls
            filler = socket.socket(family, socket.SOCK_STREAM)
            filler.settimeout(0.3)
            try:
                filler.connect((host, self.port))
            except TimeoutError:
                filler.close()
                return
            self._fillers.append(filler)
        raise RuntimeError(f"could not fill the accept queue of [{host}]:{self.port}")

    def close(self) -> None:
        for sock in self._fillers:
            sock.close()
        self._listener.close()

    def __enter__(self) -> BlackHole:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
