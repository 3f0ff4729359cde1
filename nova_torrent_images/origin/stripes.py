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

"""The stripe dispenser: the origin sends each piece about once, and the fleet the rest.

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

A host may ask for several batches at once (``batches``); it gets them only from a node
without an upload cap and while plenty are left for the other hosts (see
:meth:`StripeDispenser.assign`).

Hosts fetching stripes keep off the origin's BitTorrent port (it would only send them
duplicates), so the origin cannot introduce them to each other through peer exchange
there: each answer names the other hosts that asked lately (``peers``), a tracker of sorts.

The torrent and data answers are content-addressed by the info-hash: they carry an ETag,
Last-Modified and ``Cache-Control: public, max-age=31536000, immutable``, answer 304 to a
matching If-None-Match, and serve a range past the end to the end (a proxy's aligned
slices), so a caching proxy in front of the origin serves a zone's other hosts
(tests/integration/test_zone_cache.py: nginx). Standard BitTorrent clients still use the origin
seeder's BitTorrent port; the stripes are an addition for this project's hosts.
"""

from __future__ import annotations

import email.utils
import ipaddress
import json
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from oslo_log import log as logging

from nova_torrent_images import exception, utils
from nova_torrent_images.origin.registry import PublishedImage, Registry
from nova_torrent_images.swarm.torrent import describe

LOG = logging.getLogger(__name__)

MAX_RANGE = 64 * 1024 * 1024  # bytes one data request may ask for
MAX_BODY = 256 * 1024  # a stripe request (its want list included)
MAX_WANT = 100_000
MAX_PEERS = 50  # other hosts named in one answer
MAX_BATCHES = 16  # batches one request may ask for (a lone host: 1 MiB each was too few)
# Several batches go to one request only while a host takes at most this share of what
# is left per host that asked lately: the last batches stay small and spread over hosts.
SHARE_PER_REQUEST = 4
ACTIVE_WINDOW = 30.0  # a host that asked within this long counts as fetching
PEER_TTL = 3600.0  # a host that asked within this long is still worth naming
CHUNK = 256 * 1024  # bytes sent per rate-limiter step
# How far a response may fall behind its booked share of the uplink before the rest is
# booked again (a burst of at most this long at the cap beside the next booking).
LATE = 0.25
# Without a rate limit: sendfile() this much per call (counted per call). sendfile copies
# in the kernel, without a Python read and write (and the GIL of the origin process,
# which also runs its seeder) per 256 KiB chunk.
UNLIMITED_CHUNK = 8 * 1024 * 1024
IDLE_TIMEOUT = 120.0  # seconds a keep-alive connection may wait for its next request
IMMUTABLE = "public, max-age=31536000, immutable"
_PATH = re.compile(r"^/v1/torrents/([0-9a-f]{40}|[0-9a-f]{64})(/data|/stripes)?$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d+)$")


@dataclass
class ImageStripes:
    """Who was given which piece of one image, and when."""

    entry: PublishedImage
    torrent: bytes
    piece_length: int
    num_pieces: int
    given_at: dict[int, float] = field(default_factory=dict)  # piece -> last hand-out
    served: int = 0  # payload bytes sent
    # Hosts that asked for stripes (their BitTorrent endpoints) -> when: they keep off the
    # origin's BitTorrent port, so the origin cannot introduce them to each other there.
    peers: dict[str, float] = field(default_factory=dict)


class StripeDispenser:
    """Hands out disjoint batches of pieces per image; re-issues what went missing."""

    def __init__(
        self,
        registry: Registry,
        *,
        batch_bytes: int,
        reissue_after: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.batch_bytes = batch_bytes
        self.reissue_after = reissue_after
        self._clock = clock
        self._images: dict[str, ImageStripes] = {}
        self._lock = threading.Lock()

    def image(self, info_hash: str) -> ImageStripes | None:
        """The published image with this v1 or v2 info-hash (hex), if any."""
        with self._lock:
            known = self._images.get(info_hash)
            if known is not None and self.registry.get(known.entry.image_id) is not None:
                return known
        for entry in self.registry.list():
            if info_hash not in (entry.info_hash_v1, entry.info_hash_v2) or not entry.has_data():
                continue
            torrent = self.registry.read_torrent(entry)
            meta = describe(torrent)
            stripes = ImageStripes(entry, torrent, meta.piece_length, meta.num_pieces)
            with self._lock:
                # Hosts ask at once after an origin restart: the first one in wins, or
                # each would get its own hand-out record and the same first batches.
                current = self._images.get(info_hash)
                if current is not None and current is not known:
                    return current
                for key in (entry.info_hash_v1, entry.info_hash_v2):
                    if key:
                        self._images[key] = stripes
            return stripes
        return None

    def peers(self, stripes: ImageStripes, peer: str | None) -> list[str]:
        """Other hosts that asked for this image's stripes lately; records ``peer``."""
        now = self._clock()
        with self._lock:
            if peer:
                stripes.peers[peer] = now
            recent = sorted(
                (p for p, t in stripes.peers.items() if p != peer and now - t < PEER_TTL),
                key=lambda p: -stripes.peers[p],
            )
            for stale in [p for p, t in stripes.peers.items() if now - t >= PEER_TTL]:
                del stripes.peers[stale]
        return recent[:MAX_PEERS]

    def fetching(self, stripes: ImageStripes, peer: str | None) -> int:
        """How many hosts other than ``peer`` asked for this image's stripes lately.

        A host told none lands its stripes itself (swarm/landing.py) until one shows up.
        """
        now = self._clock()
        with self._lock:
            return sum(1 for p, t in stripes.peers.items() if p != peer and now - t < ACTIVE_WINDOW)

    def assign(
        self,
        stripes: ImageStripes,
        *,
        part: int,
        parts: int,
        want: list[int] | None = None,
        batches: int = 1,
    ) -> tuple[list[int], bool]:
        """The next pieces for a host, and whether this node has none left to give.

        Without ``want``: pieces of this node's part nobody was given yet, up to
        ``batches`` batches while each of the hosts that asked lately could still get
        :data:`SHARE_PER_REQUEST` times as many. With ``want`` (a host whose swarm went
        quiet lists what it lacks): those of them last given out more than
        ``reissue_after`` seconds ago, from any part, one batch.
        """
        per_batch = max(1, self.batch_bytes // stripes.piece_length)
        now = self._clock()
        with self._lock:
            given = stripes.given_at
            if want is None:
                free = [p for p in range(part, stripes.num_pieces, parts) if p not in given]
                hosts = max(1, sum(1 for t in stripes.peers.values() if now - t < ACTIVE_WINDOW))
                batches = max(1, min(batches, len(free) // (per_batch * SHARE_PER_REQUEST * hosts)))
                pieces = free[: per_batch * batches]
                done = len(pieces) == len(free)
            else:
                pieces = [
                    p
                    for p in dict.fromkeys(want)
                    if 0 <= p < stripes.num_pieces
                    and now - given.get(p, -1e18) > self.reissue_after
                ][:per_batch]
                done = False
            for p in pieces:
                given[p] = now
        return pieces, done


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


class _Handler(BaseHTTPRequestHandler):
    server: StripeServer
    protocol_version = "HTTP/1.1"
    # Hosts keep their connections open between requests; an idle one is closed after
    # this long (the client then reconnects), so it cannot hold a thread for good.
    timeout = IDLE_TIMEOUT
    # Headers and body leave in separate writes: with Nagle on, a kept-alive connection
    # waited for the client's delayed ACK before each body (40 ms per batch request).
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        LOG.debug("stripe server: " + format, *args)

    def _refuse(self, status: HTTPStatus, why: str) -> None:
        LOG.warning(
            "Stripe request %s %s from %s refused: %s",
            self.command,
            self.path,
            self.client_address[0],
            why,
        )
        body = json.dumps({"error": why}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _route(self) -> tuple[ImageStripes, str] | None:
        if not self.server.allowed(self.client_address[0]):
            self._refuse(HTTPStatus.FORBIDDEN, "address outside allowed_peer_cidrs")
            return None
        match = _PATH.match(self.path.split("?", 1)[0])
        if match is None:
            self._refuse(HTTPStatus.NOT_FOUND, "no such endpoint")
            return None
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
        start, end = int(match.group(1)), int(match.group(2))
        # A last byte past the end means "to the end" (RFC 9110 14.1.2): a caching proxy's
        # aligned slices ask for that on an image's last slice.
        end = min(end, size - 1)
        if start > end or end - start + 1 > MAX_RANGE:
            self._refuse(
                HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, f"range {start}-{end} of {size}"
            )
            return
        length = end - start + 1
        self.send_response(HTTPStatus.PARTIAL_CONTENT)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Accept-Ranges", "bytes")
        self._validators(etag)
        self.end_headers()
        limited = self.server.limiter.rate > 0
        booking = UplinkBooking(self.server.limiter, length) if limited else None
        with open(stripes.entry.data_path, "rb") as f:
            offset, left = start, length
            while left:
                n = min(CHUNK if limited else UNLIMITED_CHUNK, left)
                if booking is not None:
                    booking.wait(n)
                # Counted before the write: a client that has the bytes sees them counted.
                stripes.served += n
                self.server.count(n)
                sent = self.connection.sendfile(f, offset, n)
                if sent != n:
                    raise OSError(f"{stripes.entry.data_path} is shorter than {size} bytes")
                offset += n
                left -= n

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
            request = json.loads(self.rfile.read(length))
            part, parts = int(request.get("part", 0)), int(request.get("parts", 1))
            want = request.get("want")
            batches = int(request.get("batches") or 1)
            peer = request.get("peer") or None
            if peer is not None:
                host, port = utils.parse_host_port(str(peer))
                # A host names its BitTorrent endpoint (its HTTP source address may be
                # another of its addresses); only addresses the origin serves are passed on.
                if not utils.is_ip_literal(host) or not self.server.allowed(host):
                    raise ValueError(f"peer {peer} is outside allowed_peer_cidrs")
                peer = utils.format_host_port(host, port)
            if not 0 <= part < parts <= 64:
                raise ValueError(f"part {part} of {parts}")
            if not 1 <= batches <= MAX_BATCHES:
                raise ValueError(f"{batches} batches (1 to {MAX_BATCHES})")
            if want is not None:
                if not isinstance(want, list) or len(want) > MAX_WANT:
                    raise ValueError("want must be a list of piece indices")
                want = [int(p) for p in want]
        except (ValueError, TypeError, AttributeError) as exc:
            self._refuse(HTTPStatus.BAD_REQUEST, f"malformed stripe request: {exc}")
            return
        if self.server.limiter.rate > 0:
            # A capped uplink is the fleet's bottleneck: single batches spread the pieces
            # over hosts sooner, so they trade them sooner (8 hosts x 128 MiB at 32 MiB/s:
            # 6.0-6.1 s with single batches, 6.8-7.1 s with 8 per request).
            batches = 1
        pieces, done = self.server.dispenser.assign(
            stripes, part=part, parts=parts, want=want, batches=batches
        )
        peers = self.server.dispenser.peers(stripes, peer)
        body = json.dumps(
            {
                "pieces": pieces,
                "done": done,
                "peers": peers,
                "fetching": self.server.dispenser.fetching(stripes, peer),
                "piece_length": stripes.piece_length,
                "num_pieces": stripes.num_pieces,
            }
        ).encode()
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)


class StripeServer(ThreadingHTTPServer):
    """The dispenser's HTTP endpoints on one address of the origin node."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(
        self,
        listen: str,
        dispenser: StripeDispenser,
        *,
        rate_limit: int,
        allowed_cidrs: list[str],
    ) -> None:
        try:
            host, port = utils.parse_listen_address(listen)
        except ValueError as exc:
            raise exception.ConfigError(option="origin_stripe_listen", reason=str(exc)) from exc
        self.dispenser = dispenser
        self.limiter = utils.RateLimiter(rate_limit)
        self._networks = [
            ipaddress.ip_network(c.strip(), strict=False) for c in allowed_cidrs if c.strip()
        ]
        self.bytes_served = 0
        self._count_lock = threading.Lock()
        # Open connections: closed by stop(), or a host's keep-alive connection would
        # still be answered by a stopped node's handler thread.
        self._connections: set[socket.socket] = set()
        # Published bytes never change under an info-hash: the server's start is as good
        # a Last-Modified as any, and proxies that want one (heuristics, logs) get it.
        self.last_modified = email.utils.formatdate(time.time(), usegmt=True)
        try:
            super().__init__((host, port), _Handler)
        except OSError as exc:
            raise exception.ConfigError(
                option="origin_stripe_listen", reason=f"cannot listen on {listen}: {exc}"
            ) from exc
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{utils.format_host_port(host, port)}"

    def allowed(self, address: str) -> bool:
        if not self._networks:
            return True
        ip = ipaddress.ip_address(address)
        return any(ip in net for net in self._networks)

    def count(self, n: int) -> None:
        with self._count_lock:
            self.bytes_served += n

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._count_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._count_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def start(self) -> StripeServer:
        self._thread = threading.Thread(
            target=self.serve_forever, name="origin-stripes", daemon=True
        )
        self._thread.start()
        LOG.info("Origin stripes served at %s", self.url)
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        with self._count_lock:
            connections, self._connections = list(self._connections), set()
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # closed by its handler meanwhile
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


def data_path_exists(entry: PublishedImage) -> bool:
    return os.path.exists(entry.data_path)
