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

"""What one client can hold of the stripe server: connections, and time per phase.

The stripe server gives each connection a thread (``ThreadingHTTPServer``). Without
bounds, many connections from one address, a client that sends its headers a byte at a
time (a slowloris), or one that asks for a range and never reads it hold the origin's
threads and file descriptors as long as they like; a socket timeout alone does not stop
a client that sends or reads a byte just before each timeout. Here every connection has
a deadline for the phase it is in, and a reaper thread shuts down the sockets past theirs:

* idle between requests: the handler's ``timeout``;
* reading a request, from its first byte to the end of its body: ``request_timeout``;
* reading an answer: ``send_timeout`` for its headers and small bodies; for a range,
  that and a second per MiB, not counting the time the server itself waits for its
  uplink booking (a client reading slower gets its pieces faster from the swarm).

Connections over ``per_address`` from one address, or over ``total``, are answered 503
at once and closed: a host behind a proxy or NAT shares its address with the others
there (raise ``origin_stripe_connections_per_address`` for it).
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from oslo_log import log as logging

LOG = logging.getLogger(__name__)

REAP_EVERY = 0.5  # seconds between the reaper's rounds: the deadlines' resolution
LOG_EVERY = 60.0  # seconds between warnings about one address turned away
BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Retry-After: 5\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
)


@dataclass(frozen=True)
class ConnectionLimits:
    """The bounds of one stripe server (``origin_stripe_*`` options)."""

    per_address: int
    total: int
    request_timeout: float
    send_timeout: float


class ConnectionGuard:
    """Admits connections within the limits and shuts down those past their deadline."""

    def __init__(
        self, limits: ConnectionLimits, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limits = limits
        self._clock = clock
        self._lock = threading.Lock()
        self._address: dict[socket.socket, str] = {}  # open connection -> client address
        self._per_address: Counter[str] = Counter()
        self._deadline: dict[socket.socket, tuple[float, str]] = {}  # -> (when, phase)
        self._warned: dict[str, float] = {}
        self.turned_away = 0  # connections answered 503
        self.reaped: Counter[str] = Counter()  # phase -> connections shut down in it
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def admit(self, sock: socket.socket, address: str) -> str | None:
        """Register ``sock`` of ``address``; or why it is refused (then it is answered 503)."""
        with self._lock:
            if len(self._address) >= self.limits.total:
                why = f"{self.limits.total} connections open (origin_stripe_max_connections)"
            elif self._per_address[address] >= self.limits.per_address:
                why = (
                    f"{self.limits.per_address} connections open from {address} "
                    "(origin_stripe_connections_per_address)"
                )
            else:
                self._address[sock] = address
                self._per_address[address] += 1
                return None
            self.turned_away += 1
            now = self._clock()
            warn = now - self._warned.get(address, -LOG_EVERY) >= LOG_EVERY
            if warn:
                self._warned[address] = now
        if warn:  # once a minute per address: a flood must not flood the log too
            LOG.warning("Stripe connection from %s turned away: %s", address, why)
        try:
            body = b'{"error": "%s"}' % why.encode()
            sock.settimeout(1.0)  # a fresh socket's buffer takes this at once
            sock.sendall(BUSY % (len(body), body))
        except OSError as exc:
            LOG.debug("Could not answer %s: %s", address, exc)
        return why

    def release(self, sock: socket.socket) -> None:
        with self._lock:
            address = self._address.pop(sock, None)
            self._deadline.pop(sock, None)
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

    def open_connections(self) -> list[socket.socket]:
        with self._lock:
            return list(self._address)

    def reap(self) -> int:
        """Shut down the connections past their deadline; how many."""
        now = self._clock()
        with self._lock:
            late = [(s, p) for s, (t, p) in self._deadline.items() if t <= now]
            for sock, phase in late:
                del self._deadline[sock]  # once: its handler closes it
                self.reaped[phase] += 1
            addresses = [self._address.get(sock, "?") for sock, _ in late]
        for (sock, phase), address in zip(late, addresses, strict=True):
            LOG.warning(
                "Stripe connection from %s shut down: %s took too long "
                "(origin_stripe_request_timeout, origin_stripe_send_timeout)",
                address,
                phase,
            )
            try:
                sock.shutdown(socket.SHUT_RDWR)  # its handler's read or write fails now
            except OSError:
                pass  # closed by its handler meanwhile
        return len(late)

    def start(self) -> ConnectionGuard:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="stripes-reaper", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(REAP_EVERY):
            try:
                self.reap()
            except Exception:  # noqa: BLE001  the reaper must outlive any one socket
                LOG.exception("Stripe connection reaper failed a round")
