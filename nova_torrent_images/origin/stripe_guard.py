# Licensed under the Apache License, Version 2.0 (the "License"); you may
# not use this file except in compliance with the License. You may obtain
# a copy of the License at
#
#      http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS, WITHOUT
# WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied. See the
# License for the specific language governing permissions and limitations
# under the License.

"""What one client can hold of the stripe server: connections, requests, time per phase.

The stripe server reads requests on one event loop and serves only complete ones on a
bounded pool of worker threads (origin/stripe_server.py). What a connection holds is
bounded here, each bound counted where it costs:

* open connections: ``per_address`` from one address, and :attr:`ConnectionGuard.open_limit`
  in all (a file descriptor and a small buffer each, no thread). When all are taken, the
  server closes the connection silent longest (one that never sent a byte, else an idle
  keep-alive one) to make room: idle clients cannot lock out a working one;
* requests being served: ``total`` (``origin_stripe_max_connections``), a worker thread
  each. A connection counts here only once its whole request has arrived, so idle and
  slowly sending connections never take a worker from a host whose request is complete;
* time, a deadline per phase, checked by :meth:`ConnectionGuard.reap`:

  - a new connection's first request, head and body: ``request_timeout`` from the
    opening (a connection that never sends a byte is closed then);
  - idle between requests: the handler's ``timeout``; then the next request in
    ``request_timeout`` from its first byte;
  - reading an answer: ``send_timeout`` and a second per MiB of it, until the client's
    kernel has acknowledged the last byte (not only until the server's last write), not
    counting the time the server itself waits for its uplink booking.

Connections over ``per_address`` from one address, with no room in all, and complete
requests while ``total`` are being served, are answered 503 and closed: a host behind a
proxy or NAT shares its address with the others there (raise
``origin_stripe_connections_per_address`` for it).
"""

from __future__ import annotations

import json
import resource
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from oslo_log import log as logging

LOG = logging.getLogger(__name__)

LOG_EVERY = 60.0  # seconds between warnings about one address
# Open connections per request slot (``total``) unless ConnectionLimits.open_total says
# otherwise, and at most half the process's file-descriptor limit (the seeder's
# BitTorrent session and files need the rest).
OPEN_PER_BUSY = 4
BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Retry-After: 5\r\nCache-Control: no-store\r\nConnection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s"
)


def busy_answer(why: str) -> bytes:
    """The whole 503 answer that turns a client away (Retry-After: 5)."""
    body = json.dumps({"error": why}).encode()
    return BUSY % (len(body), body)


@dataclass(frozen=True)
class ConnectionLimits:
    """The bounds of one stripe server (``origin_stripe_*`` options)."""

    per_address: int  # connections open from one address
    total: int  # requests served at once (a worker thread each)
    request_timeout: float  # seconds
    send_timeout: float  # seconds, and one more per MiB of an answer
    open_total: int = 0  # connections open in all; 0: see open_limit()

    def open_limit(self) -> int:
        """Connections open in all: ``open_total``, or OPEN_PER_BUSY x ``total`` within
        half of RLIMIT_NOFILE's soft limit (and never fewer than ``total``)."""
        if self.open_total > 0:
            return self.open_total
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        fds = soft if soft != resource.RLIM_INFINITY else 1 << 20
        return max(self.total, min(OPEN_PER_BUSY * self.total, fds // 2))


class ConnectionGuard:
    """Admits connections and requests within the limits; ends those past their deadline."""

    def __init__(
        self, limits: ConnectionLimits, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limits = limits
        self.open_limit = limits.open_limit()
        self._clock = clock
        self._lock = threading.Lock()
        self._address: dict[socket.socket, str] = {}  # open connection -> client address
        self._per_address: Counter[str] = Counter()
        self._busy: set[socket.socket] = set()  # connections whose request is being served
        self._deadline: dict[socket.socket, tuple[float, str]] = {}  # -> (when, phase)
        self._late: set[socket.socket] = set()  # shut down past their deadline
        self._warned: dict[tuple[str, str], float] = {}
        self.turned_away = 0  # connections and requests answered 503
        self.reaped: Counter[str] = Counter()  # phase -> connections shut down in it

    def warn(self, address: str, kind: str, message: str, *args: Any) -> None:
        """Log ``message`` at most once per LOG_EVERY per address and kind: a flood must
        not flood the log too."""
        now = self._clock()
        with self._lock:
            if now - self._warned.get((address, kind), -LOG_EVERY) < LOG_EVERY:
                return
            if len(self._warned) > 10_000:  # many addresses: forget those warned long ago
                self._warned = {k: t for k, t in self._warned.items() if now - t < LOG_EVERY}
            self._warned[(address, kind)] = now
        LOG.warning(message, *args)

    def full(self) -> bool:
        """Whether a new connection finds no room (the server may close an idle one)."""
        with self._lock:
            return len(self._address) >= self.open_limit

    def admit(self, sock: socket.socket, address: str) -> str | None:
        """Register ``sock`` of ``address``; or why it is refused (answer it busy_answer)."""
        with self._lock:
            if self._per_address[address] >= self.limits.per_address:
                why = (
                    f"{self.limits.per_address} connections open from {address} "
                    "(origin_stripe_connections_per_address)"
                )
            elif len(self._address) >= self.open_limit:
                why = f"{self.open_limit} connections open, none of them idle"
            else:
                self._address[sock] = address
                self._per_address[address] += 1
                return None
            self.turned_away += 1
        self.warn(address, "turned away", "Stripe connection from %s turned away: %s", address, why)
        return why

    def start_request(self, sock: socket.socket) -> str | None:
        """Count ``sock``'s complete request as being served; or why not (answer 503)."""
        with self._lock:
            if len(self._busy) < self.limits.total:
                self._busy.add(sock)
                return None
            self.turned_away += 1
            address = self._address.get(sock, "?")
        why = f"{self.limits.total} requests being served (origin_stripe_max_connections)"
        self.warn(address, "busy", "Stripe request from %s turned away: %s", address, why)
        return why

    def end_request(self, sock: socket.socket) -> None:
        with self._lock:
            self._busy.discard(sock)

    def busy(self) -> int:
        """Requests being served."""
        with self._lock:
            return len(self._busy)

    def release(self, sock: socket.socket) -> None:
        with self._lock:
            address = self._address.pop(sock, None)
            self._deadline.pop(sock, None)
            self._busy.discard(sock)
            self._late.discard(sock)
            if address is not None:
                self._per_address[address] -= 1
                if not self._per_address[address]:
                    del self._per_address[address]

    def deadline(self, sock: socket.socket, seconds: float | None, phase: str = "") -> None:
        """``sock`` must be done with ``phase`` within ``seconds`` (None: no deadline)."""
        with self._lock:
            if sock not in self._address:
                return
            if seconds is None:
                self._deadline.pop(sock, None)
            else:
                self._deadline[sock] = (self._clock() + seconds, phase)

    def has_deadline(self, sock: socket.socket) -> bool:
        with self._lock:
            return sock in self._deadline

    def is_late(self, sock: socket.socket) -> bool:
        """Whether ``sock`` was shut down past its deadline (its answer is cut, not ended)."""
        with self._lock:
            return sock in self._late

    def open_connections(self) -> list[socket.socket]:
        with self._lock:
            return list(self._address)

    def reap(self) -> list[socket.socket]:
        """Shut down the connections past their deadline, and name them."""
        now = self._clock()
        with self._lock:
            late = [(s, p) for s, (t, p) in self._deadline.items() if t <= now]
            for sock, phase in late:
                del self._deadline[sock]  # once: its owner closes it
                self._late.add(sock)
                self.reaped[phase] += 1
            addresses = [self._address.get(sock, "?") for sock, _ in late]
        for (sock, phase), address in zip(late, addresses, strict=True):
            self.warn(
                address,
                "reaped",
                "Stripe connection from %s shut down: %s took too long "
                "(origin_stripe_request_timeout, origin_stripe_send_timeout)",
                address,
                phase,
            )
            try:
                sock.shutdown(socket.SHUT_RDWR)  # its worker's write fails now
            except OSError as exc:
                LOG.debug("Stripe connection from %s already closed: %s", address, exc)
        return [sock for sock, _ in late]
