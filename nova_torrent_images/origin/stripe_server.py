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

What one client can hold of the server (connections, time per request and answer) is
bounded by origin/guard.py; what it can hold of the pieces, by :meth:`StripeDispenser.assign`
(doc/source/security.rst, "The origin's stripe endpoint").

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
import re
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from oslo_log import log as logging

from nova_torrent_images import exception
from nova_torrent_images.common import utils
from nova_torrent_images.origin.registry import PublishedImage, Registry
from nova_torrent_images.origin.stripe_guard import ConnectionGuard, ConnectionLimits
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
# An address that left pieces unclaimed gets no hand-outs for this many reissue periods.
STRIKE_PERIODS = 10
# Unless origin_stripe_held_per_address says otherwise, an address holds at most this
# share of an image unclaimed, and at most HELD_MAX: a host's streams claim each hand-out
# at once, so a lone host asking 8 batches on each of its 3 streams holds 24 MiB of 1 MiB
# batches for a moment; a flood holds an eighth of a small image for at most
# origin_stripe_reissue_after, while the fleet takes the rest.
HELD_SHARE = 8
HELD_MAX = 64 * 1024 * 1024
PEER_TTL = 3600.0  # a host that asked within this long is still worth naming
CHUNK = 256 * 1024  # bytes sent per rate-limiter step
# How far a response may fall behind its booked share of the uplink before the rest is
# booked again (a burst of at most this long at the cap beside the next booking).
LATE = 0.25
# Without a rate limit: sendfile() this much per call (counted per call). sendfile copies
# in the kernel, without a Python read and write (and the GIL of the origin process,
# which also runs its seeder) per 256 KiB chunk.
UNLIMITED_CHUNK = 8 * 1024 * 1024
# A client reading slower than this from the origin gets its pieces faster from the
# swarm: a range it takes longer over (beyond origin_stripe_send_timeout) is ended and its
# pieces go to the next host that asks.
MIN_READ_RATE = 1024 * 1024  # bytes per second
IDLE_TIMEOUT = 120.0  # seconds a keep-alive connection may wait for its next request
IMMUTABLE = "public, max-age=31536000, immutable"
# The origin_stripe_* option defaults (conf/origin.py): 3 streams per host and node, and
# a fetch of the .torrent, leave room for a few hosts sharing an address.
DEFAULT_LIMITS = ConnectionLimits(
    per_address=16, total=512, request_timeout=10.0, send_timeout=10.0
)
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
    # Who holds what (client addresses): a piece is claimed once a data request for it
    # arrived; see StripeDispenser.assign for what happens to pieces never claimed.
    given_to: dict[int, str] = field(default_factory=dict)  # piece -> last given to
    unclaimed: dict[str, set[int]] = field(default_factory=dict)  # address -> pieces
    reading: Counter[str] = field(default_factory=Counter)  # data responses in flight
    last_read: dict[str, float] = field(default_factory=dict)  # address -> last one's end
    struck: dict[str, float] = field(default_factory=dict)  # address -> no hand-outs until


class StripeDispenser:
    """Hands out disjoint batches of pieces per image; re-issues what went missing."""

    def __init__(
        self,
        registry: Registry,
        *,
        batch_bytes: int,
        reissue_after: float,
        held_bytes: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.batch_bytes = batch_bytes
        self.reissue_after = reissue_after
        self.held_bytes = held_bytes
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
        address: str = "",
    ) -> tuple[list[int], bool]:
        """The next pieces for the client at ``address``, and whether this node has none left.

        Without ``want``: pieces of this node's part nobody was given yet, up to
        ``batches`` batches while each of the hosts that asked lately could still get
        :data:`SHARE_PER_REQUEST` times as many. With ``want`` (a host whose swarm went
        quiet lists what it lacks): those of them last given out more than
        ``reissue_after`` seconds ago, from any part, up to ``batches`` batches.

        What a client holds unclaimed (no data request for it yet) is bounded: at most
        ``held_bytes``, or else an eighth of the image up to 64 MiB; and pieces
        unclaimed after ``reissue_after`` by an address with no data request in flight
        or as recent go back to everyone, that address getting no hand-outs for
        :data:`STRIKE_PERIODS` periods. A client that floods the dispenser and fetches
        nothing keeps pieces from the fleet only that long.
        """
        per_batch = max(1, self.batch_bytes // stripes.piece_length)
        now = self._clock()
        with self._lock:
            self._expire_unclaimed(stripes, now)
            if stripes.struck.get(address, -1e18) > now:
                return [], False
            held = stripes.unclaimed.setdefault(address, set())
            limit = self.held_bytes or min(HELD_MAX, stripes.entry.size // HELD_SHARE)
            limit = max(limit, self.batch_bytes)
            room = max(0, -(-limit // stripes.piece_length) - len(held))
            given = stripes.given_at
            if want is None:
                free = [p for p in range(part, stripes.num_pieces, parts) if p not in given]
                hosts = max(1, sum(1 for t in stripes.peers.values() if now - t < ACTIVE_WINDOW))
                batches = max(1, min(batches, len(free) // (per_batch * SHARE_PER_REQUEST * hosts)))
                pieces = free[: min(per_batch * batches, room)]
                done = len(pieces) == len(free)
            else:
                pieces = [
                    p
                    for p in dict.fromkeys(want)
                    if 0 <= p < stripes.num_pieces
                    and now - given.get(p, -1e18) > self.reissue_after
                ][: min(per_batch * batches, room)]
                done = False
            for p in pieces:
                self._unclaim(stripes, p)
                given[p] = now
                stripes.given_to[p] = address
                held.add(p)
        return pieces, done

    @staticmethod
    def _unclaim(stripes: ImageStripes, piece: int) -> None:
        """``piece`` is no longer held unclaimed by whoever was given it last."""
        holder = stripes.given_to.get(piece)
        if holder is not None:
            stripes.unclaimed.get(holder, set()).discard(piece)

    @staticmethod
    def _whole_pieces(stripes: ImageStripes, start: int, end: int) -> range:
        """The pieces bytes ``start``-``end`` hold whole (the short last one included)."""
        if end + 1 >= stripes.entry.size:
            last = stripes.num_pieces
        else:
            last = (end + 1) // stripes.piece_length
        return range(-(-start // stripes.piece_length), last)

    def _expire_unclaimed(self, stripes: ImageStripes, now: float) -> None:
        """Give back pieces their holder never asked the data of (the lock is held)."""
        old = now - self.reissue_after
        for address, held in list(stripes.unclaimed.items()):
            if stripes.reading[address] or stripes.last_read.get(address, -1e18) >= old:
                continue
            expired = [p for p in held if stripes.given_at.get(p, now) < old]
            if not expired:
                if not held:
                    del stripes.unclaimed[address]
                continue
            for p in expired:
                held.discard(p)
                del stripes.given_to[p]
                stripes.given_at.pop(p, None)
            if stripes.struck.get(address, -1e18) > now:
                continue  # struck already: the rest of what it took before
            stripes.struck[address] = now + STRIKE_PERIODS * self.reissue_after
            LOG.warning(
                "Image %s: %s took %d pieces and asked for none of them in %.0f s "
                "(origin_stripe_reissue_after); they go to other hosts, and it gets no "
                "stripes for %.0f s",
                stripes.entry.image_id,
                address or "a client",
                len(expired),
                self.reissue_after,
                STRIKE_PERIODS * self.reissue_after,
            )
        for address in [a for a, until in stripes.struck.items() if until <= now]:
            del stripes.struck[address]
        for address in [a for a, t in stripes.last_read.items() if now - t > PEER_TTL]:
            del stripes.last_read[address]

    def reading_started(self, stripes: ImageStripes, address: str, start: int, end: int) -> None:
        """A data request for bytes ``start``-``end`` arrived: the pieces in it are claimed."""
        with self._lock:
            stripes.reading[address] += 1
            for p in self._whole_pieces(stripes, start, end):
                self._unclaim(stripes, p)

    def reading_ended(
        self, stripes: ImageStripes, address: str, start: int, end: int, *, sent: bool
    ) -> None:
        """The data response ended; one not sent whole gives its pieces back at once."""
        now = self._clock()
        with self._lock:
            stripes.reading[address] -= 1
            if stripes.reading[address] <= 0:
                del stripes.reading[address]
            stripes.last_read[address] = now
            if sent:
                return
            for p in self._whole_pieces(stripes, start, end):
                if stripes.given_to.get(p) == address:
                    del stripes.given_to[p]
                    stripes.given_at.pop(p, None)
            # Gone, or too slow to read: the swarm serves it better than new hand-outs.
            stripes.struck[address] = now + STRIKE_PERIODS * self.reissue_after


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

    def handle_one_request(self) -> None:
        # Idle until the next request's first byte, then the whole request in
        # request_timeout: a client sending a byte per socket timeout is shut down.
        guard = self.server.guard
        guard.deadline(self.connection, self.timeout, "waiting for a request")
        try:
            if not self.rfile.peek(1):
                self.close_connection = True
                return
        except OSError:  # a timeout, or the reaper shut it down
            self.close_connection = True
            return
        guard.deadline(self.connection, guard.limits.request_timeout, "sending its request")
        super().handle_one_request()

    def end_headers(self) -> None:
        # Every answer's headers and small body are due within send_timeout.
        self.server.guard.deadline(
            self.connection, self.server.guard.limits.send_timeout, "reading an answer"
        )
        super().end_headers()

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
        address = self.client_address[0]
        self.server.dispenser.reading_started(stripes, address, start, end)
        sent = False
        try:
            self._send_data(stripes, etag, start, end)
            sent = True
        except OSError as exc:
            # The client went away or stopped reading (the reaper shut it down): what it
            # was given goes to the next host that asks.
            self.close_connection = True
            LOG.info(
                "Stripe range %d-%d of image %s to %s not sent whole: %s",
                start,
                end,
                stripes.entry.image_id,
                address,
                exc,
            )
        except exception.StoreError as exc:
            self.close_connection = True  # the headers promised bytes the file lacks
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
        # MIN_READ_RATE bytes; the server's own waits for its uplink do not count.
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
        if self.server.limiter.rate > 0 and want is None:
            # A capped uplink is the fleet's bottleneck: single batches spread the pieces
            # over hosts sooner, so they trade them sooner (8 hosts x 128 MiB at 32 MiB/s:
            # 6.0-6.1 s with single batches, 6.8-7.1 s with 8 per request). Re-issues of
            # what went missing come in several: they are few, and each round of them
            # waits for a quiet swarm (a fleet beside two clients that never read: 2.5 s
            # sooner done, tests/integration/test_stripe_abuse.py).
            batches = 1
        pieces, done = self.server.dispenser.assign(
            stripes,
            part=part,
            parts=parts,
            want=want,
            batches=batches,
            address=self.client_address[0],
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
        limits: ConnectionLimits = DEFAULT_LIMITS,
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
        # Open connections, their limits and deadlines; stop() closes them, or a host's
        # keep-alive connection would still be answered by a stopped node's handler.
        self.guard = ConnectionGuard(limits)
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
        if self.guard.admit(request, client_address[0]) is not None:
            super().shutdown_request(request)  # answered 503 by the guard
            return
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        self.guard.release(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Not socketserver's traceback on stderr: a client gone (or shut down by the
        # guard) is routine; anything else is logged with its traceback.
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            LOG.debug("Stripe connection from %s ended: %s", client_address[0], error)
        else:
            LOG.exception("Stripe request from %s failed", client_address[0])

    def start(self) -> StripeServer:
        self._thread = threading.Thread(
            target=self.serve_forever, name="origin-stripes", daemon=True
        )
        self._thread.start()
        self.guard.start()
        LOG.info("Origin stripes served at %s", self.url)
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self.guard.stop()
        for connection in self.guard.open_connections():
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # closed by its handler meanwhile
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
