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

"""The stripe server: the origin sends each piece about once, and the fleet the rest.

The HTTP side; who gets which piece is :mod:`.dispenser`'s.

Why (measured, doc/source/origin.rst): libtorrent 2.1's super-seeding starts a swarm ten
seconds late, and without it no setting keeps an origin from sending duplicates. Here the
origin hands out *disjoint stripes* instead: every compute host asks for the next batch of
pieces nobody has been given yet, fetches exactly those bytes over HTTP ranges and gives
them to libtorrent (``add_piece``: hash-checked like any piece), and the swarm trades
everything else. Origin egress stays at one copy and the fleet finishes at the floor
(image size / origin uplink).

Faults it survives:

* a host that takes a stripe and dies or stalls: a host missing pieces after the swarm
  went quiet asks again naming them (``want``), and pieces whose last hand-out is older
  than ``origin_stripe_reissue_after`` are served again;
* an origin restart: the dispenser starts empty, so some pieces leave it twice;
* hosts joining late: they find nothing left to take and fetch from the swarm;
* several origin nodes behind one image: the image property lists every node's URL and a
  host asks node *i* of *n* for the pieces ``p % n == i`` (``part``/``parts``); re-issue
  requests go to any node.

Endpoints (HTTP/1.1, read-only, only published images, only ``allowed_peer_cidrs``)::

    GET  /v1/torrents/<info-hash>            the .torrent (hosts skip the metadata phase)
    GET  /v1/torrents/<info-hash>/data       image bytes, Range required and bounded
    POST /v1/torrents/<info-hash>/stripes    {"peer", "part", "parts", "want"?, "batches"?}
                                             -> {"pieces", "done", "peers", ...}
    GET  /v1/torrents/<info-hash>/status     {"image_id", "zone", "complete", "size",
                                              "served", "hosts", ...} (origin-status)

What one client can hold of the server (connections, requests, time per phase) is
bounded by origin/stripe_guard.py; what it can hold of the pieces, by
:meth:`StripeDispenser.assign`; what it can say about other hosts, by
:meth:`StripeDispenser.peers` (doc/source/security.rst, "The origin's stripe endpoint").

How it serves (why: a thread per connection let 640 idle connections from 40 addresses
fill the server, 520 threads, and a real host got 503): one event loop thread accepts
connections, reads request heads and bodies within fixed bounds (the request line, the
header count and bytes, like nginx's 8 KiB buffers; 64 connections sending 99 headers of
60 KB each grew a threaded server by 370 MiB), holds idle keep-alive connections, and
waits for each answer to be acknowledged; a bounded pool of worker threads serves only
complete requests.

A host may ask for several batches at once (``batches``); it gets them only from a node
without an upload cap and while plenty are left for the other hosts (see
:meth:`StripeDispenser.assign`).

Hosts fetching stripes keep off the origin's BitTorrent port (it would only send them
duplicates), so the origin cannot introduce them to each other through peer exchange
there: each answer names the other hosts that asked lately (``peers``), a tracker of sorts,
each at the address its request came from (a host behind a proxy is not named), those
seen fetching first.

The torrent and data answers are content-addressed by the info-hash: they carry an ETag,
Last-Modified and ``Cache-Control: public, max-age=31536000, immutable``, answer 304 to a
matching If-None-Match, and serve a range past the end to the end (a proxy's aligned
slices), so a caching proxy in front of the origin serves a zone's other hosts
(tests/integration/test_zone_cache.py: nginx). Standard BitTorrent clients still use the origin
seeder's BitTorrent port; the stripes are an addition for this project's hosts.
"""

from __future__ import annotations

import collections
import email.utils
import errno
import fcntl
import io
import ipaddress
import json
import queue
import re
import selectors
import socket
import struct
import termios
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Any

from oslo_log import log as logging

from nova_torrent_images import exception
from nova_torrent_images.common import utils
from nova_torrent_images.glance.zones import validate_zone_name
from nova_torrent_images.origin.dispenser import (
    ImageStripes,
    StripeDispenser,
    normal_address,
)
from nova_torrent_images.origin.registry import PublishedImage
from nova_torrent_images.origin.stripe_guard import (
    ConnectionGuard,
    ConnectionLimits,
    busy_answer,
)
from nova_torrent_images.swarm.torrent import bitfield_to_pieces

LOG = logging.getLogger(__name__)

MAX_RANGE = 64 * 1024 * 1024  # bytes one data request may ask for
MAX_BODY = 256 * 1024  # a stripe request (its want list included)
MAX_WANT = 100_000
MAX_BATCHES = 16  # batches one request may ask for (a lone host: 1 MiB each was too few)
CHUNK = 256 * 1024  # bytes sent per rate-limiter step
# How far a response may fall behind its booked share of the uplink before the rest is
# booked again (a burst of at most this long at the cap beside the next booking).
LATE = 0.25
# Without a rate limit: sendfile() this much per call (counted per call). sendfile copies
# in the kernel, without a Python read and write (and the GIL of the origin process,
# which also runs its seeder) per 256 KiB chunk.
UNLIMITED_CHUNK = 8 * 1024 * 1024
# A client reading slower than this from the origin gets its pieces faster from the
# swarm: an answer it takes longer over (beyond origin_stripe_send_timeout) is ended and
# the pieces of a range go to the next host that asks.
MIN_READ_RATE = 1024 * 1024  # bytes per second
IDLE_TIMEOUT = 120.0  # seconds a keep-alive connection may wait for its next request
IMMUTABLE = "public, max-age=31536000, immutable"
# The origin_stripe_* option defaults (conf/origin.py): 3 streams per host and node, and
# a fetch of the .torrent, leave room for a few hosts sharing an address.
DEFAULT_LIMITS = ConnectionLimits(
    per_address=16, total=512, request_timeout=10.0, send_timeout=10.0
)
# What a request head may hold, as nginx's large_client_header_buffers (4 x 8 KiB):
# beyond them 414 or 431, and the connection is closed. A request of ours is ~200 bytes.
MAX_REQUEST_LINE = 8 * 1024  # bytes, its CRLF included
MAX_HEADER_LINE = 8 * 1024  # bytes of one header line
MAX_HEADERS = 64  # header lines
MAX_HEAD = 16 * 1024  # bytes of the request line and headers together
# Request bodies read but not yet answered, all connections together: past this a
# request is answered 503 (each is at most MAX_BODY; ours are ~100 bytes).
MAX_BUFFERED_BODIES = 32 * 1024 * 1024
# After an answer that closes the connection: what the client still sends is read and
# dropped for this long, up to LINGER_BYTES, so it can read the answer (nginx's lingering
# close; closing with unread data would reset the connection, answer and all).
LINGER = 1.0  # seconds
LINGER_BYTES = 256 * 1024
READ_CHUNK = 64 * 1024  # bytes per recv() of the loop
DRAIN_POLL = 0.05  # seconds between checks of answers still unacknowledged
REAP_EVERY = 0.1  # seconds between deadline checks: the deadlines' resolution
ACCEPT_PAUSE = 0.1  # seconds without accept() after the process ran out of descriptors
WORKER_IDLE = 60.0  # seconds an idle worker thread waits for work before it ends
LISTEN_BACKLOG = 1024
_DIGITS = 19  # a byte position beyond 19 digits (10^19 bytes) is no position
_PATH = re.compile(r"^/v1/torrents/([0-9a-f]{40}|[0-9a-f]{64})(/data|/stripes|/status)?$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d+)$")
# SIOCOUTQ (Linux): bytes sent but not yet acknowledged, and not yet sent, of a socket.
_OUTQ = getattr(termios, "TIOCOUTQ", None)


class UplinkBooking:
    """One response's share of a capped uplink, booked whole: first come, first finished.

    Sent side by side, chunk by chunk, every batch in flight finished late and all at
    once: 32 hosts with 3 requests each held 96 MiB of a 64 MiB image, so the pieces
    reached the swarm only at the floor and the trading began then (last host 2.6x the
    floor). Booked whole, batches go one after another at the full uplink, and every
    piece reaches the swarm as early as the uplink allows. A client that does not keep up
    with its booking (more than :data:`LATE` behind) books the rest again at the back, so a
    stalled host never holds the others up.
    """

    def __init__(self, limiter: utils.RateLimiter, length: int) -> None:
        self._limiter = limiter
        self._left = length
        self._at = limiter.reserve(length)  # when the next chunk is due

    def wait(self, n: int) -> None:
        """Wait until the next ``n`` bytes are due."""
        now = time.monotonic()
        if now - self._at > LATE:
            self._at = self._limiter.reserve(self._left)
        if self._at > now:
            time.sleep(self._at - now)
        self._at += n / self._limiter.rate
        self._left -= n


class _Refused(Exception):
    """A request the loop answers itself (bounds, framing) before closing the connection."""

    def __init__(self, status: HTTPStatus, why: str) -> None:
        super().__init__(why)
        self.status = status
        self.why = why


def head_length(buf: bytes | bytearray) -> int | None:
    """The length of the request head at the start of ``buf``, its blank line included;
    None while it is incomplete. Raises :class:`_Refused` (414, 431) past the bounds."""
    end = buf.find(b"\n", 0, MAX_REQUEST_LINE)
    if end < 0:
        if len(buf) >= MAX_REQUEST_LINE:
            raise _Refused(
                HTTPStatus.REQUEST_URI_TOO_LONG, f"request line over {MAX_REQUEST_LINE} bytes"
            )
        return None
    pos, lines = end + 1, 0
    while True:
        end = buf.find(b"\n", pos, pos + MAX_HEADER_LINE)
        if end < 0:
            if len(buf) - pos >= MAX_HEADER_LINE:
                raise _Refused(
                    HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                    f"a header line over {MAX_HEADER_LINE} bytes",
                )
            if len(buf) > MAX_HEAD:
                raise _Refused(
                    HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                    f"request head over {MAX_HEAD} bytes",
                )
            return None
        if end + 1 > MAX_HEAD:
            raise _Refused(
                HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, f"request head over {MAX_HEAD} bytes"
            )
        if buf[pos:end] in (b"", b"\r"):
            return end + 1
        lines += 1
        if lines > MAX_HEADERS:
            raise _Refused(
                HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, f"over {MAX_HEADERS} header lines"
            )
        pos = end + 1


def body_framing(head: bytes) -> tuple[int, bool]:
    """(body length, whether the client waits for 100 Continue) of a request head;
    :class:`_Refused` for a body without a usable Content-Length or over MAX_BODY."""
    length: int | None = None
    expect = False
    for line in head.split(b"\n")[1:]:
        name, colon, value = line.partition(b":")
        if not colon:
            continue  # the blank line; a malformed one is the handler's 400
        name, value = name.strip().lower(), value.strip()
        if name == b"content-length":
            if not value.isdigit() or len(value) > _DIGITS:
                raise _Refused(HTTPStatus.BAD_REQUEST, "Content-Length is not a number")
            if length is not None and int(value) != length:
                raise _Refused(HTTPStatus.BAD_REQUEST, "Content-Length given twice")
            length = int(value)
        elif name == b"transfer-encoding":
            raise _Refused(HTTPStatus.LENGTH_REQUIRED, "a request body needs a Content-Length")
        elif name == b"expect":
            expect = value.lower() == b"100-continue"
    if length is not None and length > MAX_BODY:
        raise _Refused(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body of {length} bytes (at most {MAX_BODY})"
        )
    return length or 0, expect and bool(length)


def unacknowledged(sock: socket.socket) -> int:
    """Bytes of ``sock``'s answers its client's kernel has not acknowledged yet (SIOCOUTQ;
    0 where the system cannot tell)."""
    if _OUTQ is None:
        return 0
    try:
        return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), _OUTQ, b"\0\0\0\0"))[0])
    except (OSError, ValueError):  # closed meanwhile: nothing of it is held any more
        return 0


def _integer(request: dict[str, Any], name: str, default: int) -> int:
    value = request.get(name, default)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number here")


def _no_float(text: str) -> Any:
    raise ValueError(f"{text[:24]} is not an integer")


def parse_stripe_request(raw: bytes) -> dict[str, Any]:
    """A stripe request body as a JSON object; ValueError says what is wrong with it.

    Only integers are numbers here: ``Infinity``, ``NaN`` and ``1e400`` (a float
    overflowing to infinity) are refused, not handed to int(); and so is nesting
    too deep to parse (50,000 nested arrays), which json reports with RecursionError.
    """
    try:
        request = json.loads(raw, parse_constant=_no_constant, parse_float=_no_float)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    if not isinstance(request, dict):
        raise ValueError("a JSON object is required")
    return request


class _Connection:
    """One client connection: the loop's, except while a worker serves its request."""

    __slots__ = (
        "sock",
        "peer",
        "address",
        "state",
        "buf",
        "head",
        "body",
        "continued",
        "requests",
        "close_after",
        "eof",
        "out",
        "linger_until",
        "dropped",
        "reserved",
        "events",
        "closed",
    )

    def __init__(self, sock: socket.socket, peer: tuple[Any, ...]) -> None:
        self.sock = sock
        self.peer = peer
        self.address = normal_address(str(peer[0]))
        self.state = _READING
        self.buf = bytearray()
        self.head: int | None = None  # bytes of the request head, once complete
        self.body = 0  # bytes of its body
        self.continued = False  # 100 Continue sent for it
        self.requests = 0  # answered on this connection
        self.close_after = False  # close once the answer is acknowledged
        self.eof = False  # the client sends no more
        self.out = b""  # an answer of the loop's, still to write
        self.linger_until = 0.0
        self.dropped = 0  # bytes read and dropped while lingering
        self.reserved = 0  # bytes of MAX_BUFFERED_BODIES it holds
        self.events = 0  # what the selector watches for it
        self.closed = False

    def room(self) -> int:
        """Bytes the loop may read into ``buf`` now."""
        if self.state == _LINGERING or self.close_after:
            return READ_CHUNK  # dropped, not kept
        if self.head is None:
            return MAX_HEAD + 1 - len(self.buf)  # one more shows a head too long
        return self.head + self.body - len(self.buf)


_READING, _BUSY, _DRAINING, _LINGERING = "reading", "busy", "draining", "lingering"
_KEEP, _CLOSE, _ABORT = "keep", "close", "abort"  # how a worker leaves a connection
_WAKE = object()
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class _Workers:
    """Threads serving complete requests: one per request being served, kept a while.

    The guard admits at most ``total`` requests at once, so there are at most that many
    threads; idle ones end after WORKER_IDLE.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._jobs: queue.SimpleQueue[tuple[Callable[..., None], tuple[Any, ...]] | None] = (
            queue.SimpleQueue()
        )
        self._lock = threading.Lock()
        self._idle = 0  # threads waiting for a job, less the jobs queued for them
        self._threads: set[threading.Thread] = set()
        self._started = 0

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        with self._lock:
            if self._idle > 0:
                self._idle -= 1
            else:
                self._started += 1
                thread = threading.Thread(
                    target=self._work, name=f"{self._name}-{self._started}", daemon=True
                )
                self._threads.add(thread)
                thread.start()
            self._jobs.put((fn, args))

    def count(self) -> int:
        with self._lock:
            return len(self._threads)

    def _work(self) -> None:
        me = threading.current_thread()
        while True:
            try:
                job = self._jobs.get(timeout=WORKER_IDLE)
            except queue.Empty:
                with self._lock:
                    if self._jobs.empty():
                        self._idle -= 1
                        self._threads.discard(me)
                        return
                continue
            if job is None:
                with self._lock:
                    self._threads.discard(me)
                return
            fn, args = job
            try:
                fn(*args)
            except Exception:  # noqa: BLE001  a worker must outlive any one request
                LOG.exception("Stripe worker %s failed a request", me.name)
            with self._lock:
                self._idle += 1

    def stop(self, timeout: float) -> None:
        with self._lock:
            threads = list(self._threads)
        for _ in threads:
            self._jobs.put(None)
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))


class _Writer(io.BufferedIOBase):
    """A handler's wfile: every write goes out whole (sendall)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self._sock.sendall(b)
        with memoryview(b) as view:
            return view.nbytes


class _Handler(BaseHTTPRequestHandler):
    """One complete request, read by the loop, answered on a worker thread."""

    server: StripeServer  # type: ignore[assignment]  # not a socketserver's
    protocol_version = "HTTP/1.1"
    # Hosts keep their connections open between requests; an idle one is closed after
    # this long (the client then reconnects). It holds no thread meanwhile.
    timeout = IDLE_TIMEOUT

    def __init__(self, server: StripeServer, conn: _Connection, request: bytes) -> None:
        # Not BaseRequestHandler's __init__: that reads the socket and loops over requests.
        self.server = server
        self.request = self.connection = conn.sock
        self.client_address = (conn.address, *conn.peer[1:2])
        self.rfile = io.BytesIO(request)
        self.wfile = _Writer(conn.sock)
        self.close_connection = True
        self.aborted = False  # the answer was cut short: the connection must be reset
        self._answer_bytes = 0  # the body about to follow the headers
        self._headers_sent = False

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        LOG.debug("stripe server: " + format, *args)

    def handle_expect_100(self) -> bool:
        return True  # the loop sent 100 Continue before it read the body

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except OSError:
            self.aborted = True  # the client went away, or its deadline shut it down
            raise
        except Exception as exc:  # noqa: BLE001  a bug must not cost the client its answer
            self.close_connection = True
            LOG.error(
                "Stripe request %r from %s failed: %r",
                getattr(self, "requestline", ""),
                self.client_address[0],
                exc,
                exc_info=LOG.isEnabledFor(logging.DEBUG),
            )
            if self._headers_sent:
                self.aborted = True  # half an answer is out: only a reset ends it
                return
            self._reply(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error"})

    def end_headers(self) -> None:
        # The whole answer, headers and body, is due within send_timeout and a second per
        # MiB; the loop holds it to that until the client's kernel acknowledged it all.
        limits = self.server.guard.limits
        self.server.guard.deadline(
            self.connection,
            limits.send_timeout + self._answer_bytes / MIN_READ_RATE,
            "reading an answer",
        )
        self._headers_sent = True
        super().end_headers()

    def _reply(self, status: HTTPStatus, answer: dict[str, Any]) -> None:
        body = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self._answer_bytes = len(body)
        self.end_headers()
        self.wfile.write(body)

    def _refuse(self, status: HTTPStatus, why: str) -> None:
        LOG.warning(
            "Stripe request %s %s from %s refused: %s",
            self.command,
            self.path[:200],
            self.client_address[0],
            why,
        )
        self._reply(status, {"error": why})

    def _route(self) -> tuple[ImageStripes, str] | None:
        if not self.server.allowed(self.client_address[0]):
            self._refuse(HTTPStatus.FORBIDDEN, "address outside allowed_peer_cidrs")
            return None
        match = _PATH.match(self.path.split("?", 1)[0])
        if match is None:
            self._refuse(HTTPStatus.NOT_FOUND, "no such endpoint")
            return None
        if match.group(2) == "/status":
            if self.command != "GET":
                self._refuse(HTTPStatus.METHOD_NOT_ALLOWED, "the status is read with GET")
            else:
                self._send_status(match.group(1))
            return None  # answered
        stripes = self.server.dispenser.image(match.group(1))
        if stripes is None:
            self._refuse(HTTPStatus.NOT_FOUND, "not a published image")
            return None
        return stripes, match.group(2) or ""

    def do_GET(self) -> None:  # noqa: N802
        routed = self._route()
        if routed is None:
            return
        stripes, what = routed
        etag = f'"{stripes.entry.info_hash_v2 or stripes.entry.info_hash_v1}"'
        if what in ("", "/data") and self._not_modified(etag):
            return
        if what == "":
            self._send(HTTPStatus.OK, stripes.torrent, "application/x-bittorrent", etag)
        elif what == "/data":
            self._send_range(stripes, etag)
        else:
            self._refuse(HTTPStatus.METHOD_NOT_ALLOWED, "stripes are asked for with POST")

    def _send_status(self, info_hash: str) -> None:
        """``GET .../status``: how much of the image this node holds and serves (JSON).

        Read-only, never cached (``no-store``), for ``nova-torrent-images origin-status``;
        an entry whose data is still missing (re-downloading) is answered too.
        """
        entry = next(
            (
                e
                for e in self.server.dispenser.registry.list()
                if info_hash in (e.info_hash_v1, e.info_hash_v2)
            ),
            None,
        )
        if entry is None:
            self._refuse(HTTPStatus.NOT_FOUND, "not a published image")
            return
        answer: dict[str, Any] = {
            "image_id": entry.image_id,
            "zone": self.server.zone,
            "info_hash_v1": entry.info_hash_v1,
            "info_hash_v2": entry.info_hash_v2,
            "size": entry.size,
            "complete": 0.0,
            "served": 0,
            "hosts": 0,
        }
        if self.server.image_status is not None:
            answer.update(self.server.image_status(entry))
        if entry.has_data():
            answer["complete"] = 1.0
            stripes = self.server.dispenser.image(info_hash)
            if stripes is not None:
                answer["served"] = stripes.served
                answer["hosts"] = self.server.dispenser.fetching(stripes, None)
        self._reply(HTTPStatus.OK, answer)

    def _validators(self, etag: str) -> None:
        # Content-addressed: the info-hash names the bytes, so a cache may keep them for
        # good and revalidate (If-None-Match) without a transfer.
        self.send_header("ETag", etag)
        self.send_header("Cache-Control", IMMUTABLE)
        if self.server.last_modified:
            self.send_header("Last-Modified", self.server.last_modified)

    def _not_modified(self, etag: str) -> bool:
        """Answer 304 to a cache revalidating with a matching If-None-Match."""
        tags = [t.strip() for t in self.headers.get("If-None-Match", "").split(",")]
        if etag not in tags and f"W/{etag}" not in tags and "*" not in tags:
            return False
        self.send_response(HTTPStatus.NOT_MODIFIED)
        self._validators(etag)
        self.send_header("Content-Length", "0")
        self.end_headers()
        return True

    def _send(self, status: HTTPStatus, body: bytes, kind: str, etag: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self._validators(etag)
        self._answer_bytes = len(body)
        self.end_headers()
        self.wfile.write(body)

    def _send_range(self, stripes: ImageStripes, etag: str) -> None:
        size = stripes.entry.size
        match = _RANGE.match(self.headers.get("Range", ""))
        if match is None:
            self._refuse(
                HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, "a single bytes=a-b Range is required"
            )
            return
        if max(len(match.group(1)), len(match.group(2))) > _DIGITS:
            # int() of 5,000 digits raises (Python's 4,300-digit limit), and no image
            # has a byte position that long.
            self._refuse(HTTPStatus.BAD_REQUEST, f"malformed Range: over {_DIGITS} digits")
            return
        start, end = int(match.group(1)), int(match.group(2))
        # A last byte past the end means "to the end" (RFC 9110 14.1.2): a caching proxy's
        # aligned slices ask for that on an image's last slice.
        end = min(end, size - 1)
        if start > end or end - start + 1 > MAX_RANGE:
            self._refuse(
                HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, f"range {start}-{end} of {size}"
            )
            return
        address = self.client_address[0]
        stripes = self.server.dispenser.for_address(stripes, address)
        self.server.dispenser.reading_started(stripes, address, start, end)
        sent = False
        try:
            self._send_data(stripes, etag, start, end)
            sent = True
        except OSError as exc:
            # The client went away or stopped reading (its deadline shut it down): what it
            # was given goes to the next host that asks.
            self.close_connection = self.aborted = True
            LOG.info(
                "Stripe range %d-%d of image %s to %s not sent whole: %s",
                start,
                end,
                stripes.entry.image_id,
                address,
                exc,
            )
        except exception.StoreError as exc:
            # The headers promised bytes the file lacks: only a reset tells the client.
            self.close_connection = self.aborted = True
            LOG.error("Stripe range %d-%d of image %s: %s", start, end, stripes.entry.image_id, exc)
        finally:
            self.server.dispenser.reading_ended(stripes, address, start, end, sent=sent)

    def _send_data(self, stripes: ImageStripes, etag: str, start: int, end: int) -> None:
        size, length = stripes.entry.size, end - start + 1
        self.send_response(HTTPStatus.PARTIAL_CONTENT)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Accept-Ranges", "bytes")
        self._validators(etag)
        self.end_headers()
        self.wfile.flush()
        guard = self.server.guard
        limited = self.server.limiter.rate > 0
        booking = UplinkBooking(self.server.limiter, length) if limited else None
        # The client's time to read the range: send_timeout, and a second per
        # MIN_READ_RATE bytes; the server's own waits for its uplink do not count. The
        # deadline left after the last write holds until the client acknowledged it all.
        budget = guard.limits.send_timeout + length / MIN_READ_RATE
        with open(stripes.entry.data_path, "rb") as f:
            offset, left = start, length
            while left:
                n = min(CHUNK if limited else UNLIMITED_CHUNK, left)
                if booking is not None:
                    guard.deadline(self.connection, None)  # the server's own wait
                    booking.wait(n)
                guard.deadline(self.connection, budget, "reading a range")
                # Counted before the write: a client that has the bytes sees them counted.
                stripes.served += n
                self.server.count(n)
                began = time.monotonic()
                sent = self.connection.sendfile(f, offset, n)
                budget -= time.monotonic() - began
                if sent != n:
                    raise exception.StoreError(
                        reason=f"{stripes.entry.data_path} is shorter than {size} bytes"
                    )
                offset += n
                left -= n

    def _peer(self, named: Any) -> str | None:
        """The BitTorrent endpoint a stripe request names, as other hosts may be told it.

        A host may name only itself: the address its request came from (the client
        binds it to its BitTorrent address), with the port it names. An unspecified
        address (a host listening on all of its addresses) means that address too; any
        other address is not passed on (a client once named 25,682 fake peers), and the
        request is served all the same (a host behind a proxy or NAT is not introduced).
        """
        if named is None or named == "":
            return None
        if not isinstance(named, str):
            raise ValueError("peer must be host:port")
        host, port = utils.parse_host_port(named)
        if not utils.is_ip_literal(host):
            raise ValueError(f"peer {named[:100]} is not an IP address")
        source = self.client_address[0]
        if not ipaddress.ip_address(host).is_unspecified and normal_address(host) != source:
            self.server.guard.warn(
                source,
                "peer",
                "Stripe request from %s names peer %s, not its own address: not passed "
                "on to other hosts",
                source,
                named[:100],
            )
            return None
        return utils.format_host_port(source, port)

    def do_POST(self) -> None:  # noqa: N802
        routed = self._route()
        if routed is None:
            return
        stripes, what = routed
        if what != "/stripes":
            self._refuse(HTTPStatus.METHOD_NOT_ALLOWED, "only stripes are asked for with POST")
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
            if not 0 < length <= MAX_BODY:
                raise ValueError(f"body of {length} bytes")
            request = parse_stripe_request(self.rfile.read(length))
            part, parts = _integer(request, "part", 0), _integer(request, "parts", 1)
            want = request.get("want")
            batches = _integer(request, "batches", 1) or 1
            peer = self._peer(request.get("peer"))
            have = request.get("have")
            if have is not None:
                if not isinstance(have, str):
                    raise ValueError("have must be a base64 bitfield")
                have = bitfield_to_pieces(have, stripes.num_pieces)
            zone = request.get("zone")
            if zone is not None:
                if not isinstance(zone, str):
                    raise ValueError("zone must be a string")
                validate_zone_name(zone)
            if not 0 <= part < parts <= 64:
                raise ValueError(f"part {part} of {parts}")
            if not 1 <= batches <= MAX_BATCHES:
                raise ValueError(f"{batches} batches (1 to {MAX_BATCHES})")
            if want is not None:
                if not isinstance(want, list) or len(want) > MAX_WANT:
                    raise ValueError("want must be a list of piece indices")
                if not all(isinstance(p, int) and not isinstance(p, bool) for p in want):
                    raise ValueError("want must be a list of piece indices")
        except ValueError as exc:
            self._refuse(HTTPStatus.BAD_REQUEST, f"malformed stripe request: {exc}")
            return
        if self.server.limiter.rate > 0 and want is None:
            # A capped uplink is the fleet's bottleneck: single batches spread the pieces
            # over hosts sooner, so they trade them sooner (8 hosts x 128 MiB at 32 MiB/s:
            # 6.0-6.1 s with single batches, 6.8-7.1 s with 8 per request). Re-issues of
            # what went missing come in several: they are few, and each round of them
            # waits for a quiet swarm (a fleet beside two clients that never read: 2.5 s
            # sooner done, tests/integration/test_stripe_abuse.py).
            batches = 1
        stripes = self.server.dispenser.for_zone(stripes, zone, self.client_address[0])
        pieces, done = self.server.dispenser.assign(
            stripes,
            part=part,
            parts=parts,
            want=want,
            batches=batches,
            address=self.client_address[0],
            have=have,
        )
        source = self.client_address[0]
        peers = self.server.dispenser.peers(stripes, peer, address=source)
        self._reply(
            HTTPStatus.OK,
            {
                "pieces": pieces,
                "done": done,
                "peers": peers,
                "fetching": self.server.dispenser.fetching(stripes, peer, address=source),
                "piece_length": stripes.piece_length,
                "num_pieces": stripes.num_pieces,
            },
        )


class StripeServer:
    """The dispenser's HTTP endpoints on one address of the origin node.

    One loop thread ("origin-stripes") owns every connection but those whose request a
    worker thread is serving; see the module's docstring for why.
    """

    def __init__(
        self,
        listen: str,
        dispenser: StripeDispenser,
        *,
        rate_limit: int,
        allowed_cidrs: list[str],
        limits: ConnectionLimits = DEFAULT_LIMITS,
        zone: str | None = None,
        image_status: Callable[[PublishedImage], dict[str, Any]] | None = None,
    ) -> None:
        """``zone``: the node's ``origin_zone``, and ``image_status``: more of an image's
        state (the seeder's: ``complete`` of an image it re-downloads, BitTorrent
        ``uploaded`` and ``peers``), both only for ``GET .../status``."""
        try:
            host, port = utils.parse_listen_address(listen)
        except ValueError as exc:
            raise exception.ConfigError(option="origin_stripe_listen", reason=str(exc)) from exc
        self.dispenser = dispenser
        self.zone = zone
        self.image_status = image_status
        self.limiter = utils.RateLimiter(rate_limit)
        self._networks = [
            ipaddress.ip_network(c.strip(), strict=False) for c in allowed_cidrs if c.strip()
        ]
        self.bytes_served = 0
        self._count_lock = threading.Lock()
        self.guard = ConnectionGuard(limits)
        self.evicted = 0  # idle connections closed to make room for new ones
        # Published bytes never change under an info-hash: the server's start is as good
        # a Last-Modified as any, and proxies that want one (heuristics, logs) get it.
        self.last_modified = email.utils.formatdate(time.time(), usegmt=True)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind((host, port))
            self._listener.listen(LISTEN_BACKLOG)
            self._listener.setblocking(False)
        except OSError as exc:
            self._listener.close()
            raise exception.ConfigError(
                option="origin_stripe_listen", reason=f"cannot listen on {listen}: {exc}"
            ) from exc
        self.server_address: tuple[Any, ...] = self._listener.getsockname()
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._returns: queue.SimpleQueue[tuple[_Connection, str]] = queue.SimpleQueue()
        self._workers = _Workers("origin-stripes-worker")
        self._connections: dict[socket.socket, _Connection] = {}
        # Connections that may be closed to make room, longest silent first: those that
        # never sent a byte, then idle keep-alive ones.
        self._silent: collections.OrderedDict[_Connection, None] = collections.OrderedDict()
        self._idle: collections.OrderedDict[_Connection, None] = collections.OrderedDict()
        self._draining: set[_Connection] = set()
        self._lingering: set[_Connection] = set()
        self._buffered = 0  # request body bytes held (MAX_BUFFERED_BODIES)
        self._accept_paused_until = 0.0
        self._last_reap = 0.0
        self._last_poll = 0.0
        self._stopping = threading.Event()
        self._handback_lock = threading.Lock()
        self._loop_done = False
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{utils.format_host_port(str(host), int(port))}"

    def allowed(self, address: str) -> bool:
        if not self._networks:
            return True
        ip = ipaddress.ip_address(address)
        return any(ip in net for net in self._networks)

    def count(self, n: int) -> None:
        with self._count_lock:
            self.bytes_served += n

    def threads(self) -> int:
        """Worker threads alive (each serving, or waiting a while for, a request)."""
        return self._workers.count()

    def start(self) -> StripeServer:
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._selector.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        self._thread = threading.Thread(target=self._run, name="origin-stripes", daemon=True)
        self._thread.start()
        LOG.info("Origin stripes served at %s", self.url)
        return self

    def stop(self) -> None:
        """Close the listener and every connection (a stopped node answers no kept one)."""
        self._stopping.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        else:
            self._shut_everything()
        self._workers.stop(timeout=5)

    # -- the loop --------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                timeout = DRAIN_POLL if self._draining or self._lingering else REAP_EVERY
                for key, mask in self._selector.select(timeout):
                    if key.data is None:
                        self._accept()
                    elif key.data is _WAKE:
                        self._take_back()
                    else:
                        self._safely(key.data, self._on_event, mask)
                self._tick()
        except Exception:  # noqa: BLE001  logged: the node then serves no stripes
            LOG.exception("Stripe server loop at %s failed; no more stripes served", self.url)
        finally:
            self._shut_everything()

    def _safely(self, conn: _Connection, action: Callable[..., None], *args: Any) -> None:
        """``action(conn, *args)``; a failure closes that connection, not the loop."""
        try:
            action(conn, *args)
        except Exception:  # noqa: BLE001  one connection must not end the loop
            LOG.exception("Stripe connection from %s failed", conn.address)
            self._close(conn, abort=True)

    def _shut_everything(self) -> None:
        with self._handback_lock:
            if self._loop_done:
                return
            self._loop_done = True  # workers close their connections themselves now
        for conn in list(self._connections.values()):
            if conn.state == _BUSY:
                try:
                    conn.sock.shutdown(socket.SHUT_RDWR)  # its worker's write fails now
                except OSError as exc:
                    LOG.debug("Stripe connection from %s: %s", conn.address, exc)
            else:
                self._close(conn)
        while True:
            try:
                conn, _ = self._returns.get_nowait()
            except queue.Empty:
                break
            self._close(conn, abort=True)
        for sock in (self._listener, self._wake_r, self._wake_w):
            sock.close()
        self._selector.close()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except BlockingIOError:
            pass  # full: the loop wakes up anyway
        except OSError as exc:
            LOG.debug("Stripe server wake-up not sent: %s", exc)

    def _tick(self) -> None:
        now = time.monotonic()
        if now - self._last_reap >= REAP_EVERY:
            self._last_reap = now
            for sock in self.guard.reap():
                conn = self._connections.get(sock)
                if conn is not None and conn.state != _BUSY:  # a worker's: it ends it
                    self._close(conn, abort=True)
        if now - self._last_poll >= DRAIN_POLL:
            self._last_poll = now
            for conn in list(self._draining):
                self._safely(conn, self._check_drained)
            for conn in list(self._lingering):
                if now >= conn.linger_until:
                    self._close(conn)
        if self._accept_paused_until and now >= self._accept_paused_until:
            self._accept_paused_until = 0.0
            self._selector.register(self._listener, selectors.EVENT_READ, None)

    def _accept(self) -> None:
        for _ in range(64):  # then the other connections' turn
            try:
                sock, peer = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno not in _OUT_OF_RESOURCES:
                    LOG.debug("Stripe connection not accepted: %s", exc)  # gone already
                    continue
                # Out of file descriptors: an idle connection makes room, or accepting
                # waits a moment (the listener would wake the loop at once, all the time).
                if not self._evict():
                    self.guard.warn(
                        "", "accept", "Stripe server cannot accept connections: %s", exc
                    )
                    self._selector.unregister(self._listener)
                    self._accept_paused_until = time.monotonic() + ACCEPT_PAUSE
                return
            try:
                self.process_request(sock, peer)
            except Exception:  # noqa: BLE001  one connection must not end the loop
                LOG.exception("Stripe connection from %s failed", peer[0])
                conn = self._connections.get(sock)
                if conn is not None:
                    self._close(conn, abort=True)
                else:
                    sock.close()

    def process_request(self, request: socket.socket, client_address: tuple[Any, ...]) -> None:
        """Take a new connection in, or answer it 503 and close it."""
        sock = request
        try:
            sock.setblocking(False)
            # Headers and body leave in separate writes: with Nagle on, a kept-alive
            # connection waited for the client's delayed ACK before each body.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            LOG.debug("Stripe connection from %s gone at once: %s", client_address[0], exc)
            sock.close()
            return
        conn = _Connection(sock, client_address)
        if self.guard.full():
            self._evict()
        why = self.guard.admit(sock, conn.address)
        if why is not None:
            try:
                sock.send(busy_answer(why))  # a new connection's buffer takes it at once
                sock.shutdown(socket.SHUT_WR)
            except OSError as exc:
                LOG.debug("Could not answer %s: %s", conn.address, exc)
            sock.close()
            return
        self._connections[sock] = conn
        self._silent[conn] = None
        # A new connection's first request is due within request_timeout of its opening:
        # one that never sends a byte holds its descriptor no longer.
        self.guard.deadline(sock, self.guard.limits.request_timeout, "sending its request")
        self._watch(conn)

    def _evict(self) -> bool:
        """Close the connection silent longest to make room; whether there was one."""
        for idle in (self._silent, self._idle):
            if idle:
                conn = next(iter(idle))
                self.evicted += 1
                LOG.debug("Stripe connection from %s closed to make room", conn.address)
                self._close(conn)
                return True
        return False

    def _watch(self, conn: _Connection) -> None:
        """Have the selector watch what ``conn`` waits for in its state."""
        events = 0
        if conn.state != _BUSY and not conn.closed:
            if not conn.eof and conn.room() > 0:
                events |= selectors.EVENT_READ
            if conn.out:
                events |= selectors.EVENT_WRITE
        if events == conn.events:
            return
        if not conn.events:
            self._selector.register(conn.sock, events, conn)
        elif not events:
            self._selector.unregister(conn.sock)
        else:
            self._selector.modify(conn.sock, events, conn)
        conn.events = events

    def _on_event(self, conn: _Connection, mask: int) -> None:
        if conn.closed:
            return  # closed earlier in this round (made room for a new one)
        if mask & selectors.EVENT_WRITE:
            self._flush(conn)
        if mask & selectors.EVENT_READ and not conn.closed:
            self._read(conn)

    def _read(self, conn: _Connection) -> None:
        room = conn.room()
        if room <= 0:
            self._watch(conn)
            return
        try:
            data = conn.sock.recv(min(room, READ_CHUNK))
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            LOG.debug("Stripe connection from %s ended: %s", conn.address, exc)
            self._close(conn, abort=True)
            return
        if not data:
            if conn.state == _DRAINING:
                conn.eof = True  # it may still read what is left of the answer
                self._watch(conn)
                self._check_drained(conn)  # its FIN acknowledged the answer, mostly
            else:
                self._close(conn)
            return
        if conn.state == _LINGERING or conn.close_after:
            conn.dropped += len(data)
            if conn.dropped > LINGER_BYTES:
                self._close(conn)
            return
        if not conn.buf:
            self._silent.pop(conn, None)
            self._idle.pop(conn, None)
            if conn.state == _READING and conn.requests:
                # The next request on a kept connection: due within request_timeout.
                self.guard.deadline(
                    conn.sock, self.guard.limits.request_timeout, "sending its request"
                )
        conn.buf += data
        if conn.state == _DRAINING:
            self._watch(conn)  # read on once the answer is acknowledged
            self._check_drained(conn)
        else:
            self._advance(conn)

    def _advance(self, conn: _Connection) -> None:
        """Parse what ``conn`` sent; hand a complete request to a worker."""
        try:
            if conn.head is None:
                while conn.buf[:1] in (b"\r", b"\n"):  # CRLFs between requests (RFC 9112)
                    del conn.buf[:1]
                conn.head = head_length(conn.buf)
                if conn.head is None:
                    self._watch(conn)
                    return
                conn.body, expect = body_framing(bytes(conn.buf[: conn.head]))
                if self._buffered + conn.body > MAX_BUFFERED_BODIES:
                    raise _Refused(
                        HTTPStatus.SERVICE_UNAVAILABLE,
                        f"{MAX_BUFFERED_BODIES} bytes of request bodies being read",
                    )
                self._buffered += conn.body
                conn.reserved = conn.body
                if expect and len(conn.buf) < conn.head + conn.body:
                    self._continue(conn)
        except _Refused as refused:
            conn.head = None
            self._answer(conn, refused.status, refused.why)
            return
        if len(conn.buf) < conn.head + conn.body:
            self._watch(conn)
            return
        why = self.guard.start_request(conn.sock)
        if why is not None:
            self._answer(conn, HTTPStatus.SERVICE_UNAVAILABLE, why, log=False)
            return
        size = conn.head + conn.body
        request = bytes(conn.buf[:size])
        del conn.buf[:size]
        conn.head, conn.body, conn.continued = None, 0, False
        conn.state = _BUSY
        self._watch(conn)
        self.guard.deadline(conn.sock, None)  # the handler sets its answer's deadline
        self._workers.submit(self._serve, conn, request)

    def _continue(self, conn: _Connection) -> None:
        if conn.continued:
            return
        conn.continued = True
        try:
            conn.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        except OSError as exc:  # the client sends its body after its own wait then
            LOG.debug("Stripe connection from %s: no 100 Continue sent: %s", conn.address, exc)

    def _answer(self, conn: _Connection, status: HTTPStatus, why: str, *, log: bool = True) -> None:
        """Answer ``conn`` from the loop (a request it refuses) and close it after."""
        if log:
            self.guard.warn(
                conn.address, "refused", "Stripe request from %s refused: %s", conn.address, why
            )
        if status == HTTPStatus.SERVICE_UNAVAILABLE:
            conn.out = busy_answer(why)
        else:
            body = json.dumps({"error": why}).encode()
            conn.out = (
                f"HTTP/1.1 {status.value} {status.phrase}\r\nContent-Type: application/json\r\n"
                f"Cache-Control: no-store\r\nConnection: close\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode() + body
        self._release_body(conn)
        conn.buf.clear()
        conn.close_after = True
        self._silent.pop(conn, None)
        self.guard.deadline(conn.sock, self.guard.limits.send_timeout, "reading an answer")
        self._drain(conn)

    def _release_body(self, conn: _Connection) -> None:
        self._buffered -= conn.reserved
        conn.reserved = 0

    # -- answers: the worker's part and the loop's -------------------------------------
    def _serve(self, conn: _Connection, request: bytes) -> None:
        """A worker thread: answer ``request``, then give the connection back."""
        outcome = _KEEP
        try:
            conn.sock.settimeout(IDLE_TIMEOUT)  # a backstop: the guard's deadlines come first
            handler = _Handler(self, conn, request)
            handler.handle_one_request()
            if handler.aborted:
                outcome = _ABORT
            elif handler.close_connection:
                outcome = _CLOSE
        except OSError as exc:
            LOG.debug("Stripe connection from %s ended: %s", conn.address, exc)
            outcome = _ABORT
        finally:
            self.guard.end_request(conn.sock)
            with self._handback_lock:
                done = self._loop_done
                if not done:
                    self._returns.put((conn, outcome))
            if done:  # the server stopped meanwhile
                conn.sock.close()
                self.guard.release(conn.sock)
            else:
                self._wake()

    def _take_back(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass  # all read
        while True:
            try:
                conn, outcome = self._returns.get_nowait()
            except queue.Empty:
                return
            self._release_body(conn)
            if outcome == _ABORT or self.guard.is_late(conn.sock):
                self._close(conn, abort=True)
                continue
            try:
                conn.sock.setblocking(False)
            except OSError as exc:
                LOG.debug("Stripe connection from %s ended: %s", conn.address, exc)
                self._close(conn, abort=True)
                continue
            if not self.guard.has_deadline(conn.sock):
                self.guard.deadline(conn.sock, self.guard.limits.send_timeout, "reading an answer")
            conn.requests += 1
            conn.close_after = outcome == _CLOSE
            self._safely(conn, self._drain)

    def _drain(self, conn: _Connection) -> None:
        """Hold ``conn`` until its answer is acknowledged, under the answer's deadline:
        a small answer fits the socket buffers at once, and a client reading it a few
        bytes a second held its connection open long after the last write (40 s and
        more, the deadline being 10 s)."""
        conn.state = _DRAINING
        self._draining.add(conn)
        self._flush(conn)
        if not conn.closed:
            self._check_drained(conn)

    def _flush(self, conn: _Connection) -> None:
        while conn.out:
            try:
                sent = conn.sock.send(conn.out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                LOG.debug("Stripe connection from %s ended: %s", conn.address, exc)
                self._close(conn, abort=True)
                return
            conn.out = conn.out[sent:]
        self._watch(conn)

    def _check_drained(self, conn: _Connection) -> None:
        if conn.closed or conn.out or unacknowledged(conn.sock) > 0:
            return
        self._draining.discard(conn)
        if conn.eof:
            self._close(conn)
        elif conn.close_after:
            self._linger(conn)
        else:
            conn.state = _READING
            if conn.buf:
                self.guard.deadline(
                    conn.sock, self.guard.limits.request_timeout, "sending its request"
                )
                self._advance(conn)
            else:
                self.guard.deadline(conn.sock, _Handler.timeout, "waiting for a request")
                self._idle[conn] = None
                self._watch(conn)

    def _linger(self, conn: _Connection) -> None:
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            LOG.debug("Stripe connection from %s ended: %s", conn.address, exc)
            self._close(conn, abort=True)
            return
        conn.state = _LINGERING
        conn.linger_until = time.monotonic() + LINGER
        self._lingering.add(conn)
        self.guard.deadline(conn.sock, None)  # LINGER ends it
        self._watch(conn)

    def _close(self, conn: _Connection, *, abort: bool = False) -> None:
        """Close ``conn``; ``abort``: with a reset, dropping what its client did not read
        (closed plainly, the kernel would go on sending it to a client that reads slowly)."""
        if conn.closed:
            return
        conn.closed = True
        if conn.events:
            self._selector.unregister(conn.sock)
            conn.events = 0
        self._silent.pop(conn, None)
        self._idle.pop(conn, None)
        self._draining.discard(conn)
        self._lingering.discard(conn)
        self._release_body(conn)
        self._connections.pop(conn.sock, None)
        self.guard.release(conn.sock)
        try:
            if abort:
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError as exc:
            LOG.debug("Stripe connection from %s: %s", conn.address, exc)
        conn.sock.close()
