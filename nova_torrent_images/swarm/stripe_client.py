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

"""A compute host's side of the origin's stripes (:mod:`nova_torrent_images.origin.stripe_server`).

:class:`StripeClient` talks to the origin nodes the image's ``torrent_stripes`` property
names: the .torrent, the next batch of pieces, byte ranges. :class:`StripeWorker` runs
beside a :class:`~nova_torrent_images.swarm.transfer.Transfer`: it fetches the batches the
dispenser gives this host and hands each piece to libtorrent with ``add_piece`` (hash-checked
against the torrent like any piece), offers in-order bytes to the image hash so they are
never read back, and, once the dispenser has nothing left and the swarm has gone quiet,
asks for the pieces this host still lacks (a host that took them died or stalls).

Nothing the origin sends is trusted: the .torrent must hash to the magnet's info-hash,
every piece to the torrent, the whole image to Glance's hash.
"""

from __future__ import annotations

import collections
import http.client
import ipaddress
import json
import threading
import time
import urllib.parse
from collections.abc import Callable

from oslo_log import log as logging

from nova_torrent_images import exception
from nova_torrent_images.common import qos
from nova_torrent_images.common.utils import RateLimiter, parse_host_port
from nova_torrent_images.glance.zones import parse_stripe_list
from nova_torrent_images.swarm.landing import PieceLanding
from nova_torrent_images.swarm.torrent import pieces_to_bitfield

LOG = logging.getLogger(__name__)

HTTP_TIMEOUT = 30.0
# After the dispenser ran dry, how long the swarm may make no progress before this host
# asks for the pieces it lacks (the origin re-issues those given out long enough ago).
QUIET_BEFORE_ASKING = 2.0
STREAMS = 3  # requests a host has in flight at once
# Batches asked for per request (the origin may give fewer, an older one gives one). With
# one 1 MiB batch per request a lone host's streams spent more time waiting for answers
# (6 ms each, both processes' GILs busy) than reading bytes: 512 MiB with the trusted
# root took 3.0-3.4 s, with 8 batches 2.0-2.2 s (3 rounds each, same run).
BATCHES_PER_REQUEST = 8
# Bytes fetched but not yet offered to the image hash: the streams wait beyond this.
HASH_BACKLOG = 32 * 1024 * 1024
# A node that refused or reset a connection is left out this long; its part of the image
# goes to the live nodes meanwhile (several origin nodes are one service).
NODE_DOWN_FOR = 5.0
# How often a host tells the nodes which pieces it holds (in a batch request): a node that
# restarted, or one of another zone the host just turned to, then hands out only what no
# host has, instead of the whole image again.
HAVE_EVERY = 2.0


def parse_stripe_urls(value: object, allowed_cidrs: tuple[str, ...]) -> tuple[str, ...]:
    """The stripe URLs of an image property; ValueError says what is wrong.

    Any image owner may write the property, so only ``http://<IP>:<port>`` URLs
    (:func:`~nova_torrent_images.glance.zones.parse_stripe_list`) inside
    ``allowed_peer_cidrs`` are taken: no names to resolve, nothing outside the fabric.
    """
    urls = parse_stripe_list(value)
    networks = [ipaddress.ip_network(c, strict=False) for c in allowed_cidrs if c.strip()]
    for url in urls:
        address = ipaddress.ip_address(urllib.parse.urlsplit(url).hostname or "")
        if networks and not any(address in net for net in networks):
            raise ValueError(f"{url!r} is outside allowed_peer_cidrs")
    return urls


class StripeClient:
    """HTTP to the origin nodes of one image (their order is the image property's).

    Each thread keeps one HTTP/1.1 connection per origin node: a new TCP connection per
    request (urllib) cost 1.5 s of a 512 MiB fetch in batch requests alone.

    The nodes are those of one zone (``urls``); ``fallback`` lists other zones' nodes,
    used in turn once every node of the current zone is down (glance/zones.py ``plan``).
    """

    def __init__(
        self,
        image_id: str,
        urls: tuple[str, ...],
        info_hash: str,
        peer: str,
        source_host: str | None = None,
        downlink: RateLimiter | None = None,
        *,
        zone: str | None = None,
        urls_zone: str | None = None,
        fallback: tuple[tuple[str | None, tuple[str, ...]], ...] = (),
    ) -> None:
        """``downlink``: the host's budget for stripe bytes (``download_rate_limit``),
        shared by every stream and transfer of the host. ``zone``: the host's, named in
        stripe requests (a node hands each zone every piece once); ``urls_zone``: the
        zone of ``urls``; ``fallback``: (zone, urls) of the nodes to use next, in order."""
        self.image_id = image_id
        self.urls = urls
        self.zone = zone
        self.urls_zone = urls_zone
        self._fallback = list(fallback)
        self._generation = 0  # bumped when the nodes change: connections are per node index
        # Payload bytes per node URL (the operator's and the zone tests' cross-zone figure).
        self.bytes_by_url: collections.Counter[str] = collections.Counter()
        # Called with the zone whose nodes are used from now on (the transfer adds that
        # zone's trackers and seeders).
        self.on_fall_back: Callable[[str | None], None] | None = None
        # The pieces this host holds (the worker sets it), sent every HAVE_EVERY seconds.
        self.have: Callable[[], list[int]] | None = None
        self._have_sent_at = -1e18
        self.info_hash = info_hash
        self.peer = peer
        # The address the host's BitTorrent traffic leaves from: the origin's per-address
        # bounds (origin/guard.py) then count each host once, as its peers see it.
        self.source_host = source_host
        # Stripe bytes do not pass libtorrent's limiter (add_piece, or landed here), and a
        # host alone gets the whole image this way: the host's cap must hold for them too.
        self.downlink = downlink
        self._next_part = 0
        self._dry: set[int] = set()  # parts whose node has nothing new left
        self._down: dict[int, float] = {}  # node -> when it refused or reset a connection
        self._answered_at: dict[int, float] = {}  # node -> when it last answered
        self.on_peers: Callable[[list[tuple[str, int]]], None] | None = None
        self._known_peers: set[str] = set()
        self._lock = threading.Lock()  # the worker's streams share the client
        self._local = threading.local()  # this thread's connections: part -> connection
        self._path = f"/v1/torrents/{info_hash}"
        # Other hosts fetching this image's stripes, as the last answer said (None: the
        # origin does not say): a host alone lands its stripes itself (swarm/landing.py).
        self.others_fetching: int | None = None

    def _url(self, part: int) -> str:
        # Any node serves any byte range: a range of a batch a node of the previous zone
        # gave (fall_back changed the nodes since) is read from the new zone's node.
        urls = self.urls
        return urls[part % len(urls)]

    def _connection(self, part: int) -> tuple[http.client.HTTPConnection, bool]:
        """This thread's connection to node ``part``, and whether it was used before."""
        conns = getattr(self._local, "conns", None)
        if conns is None or getattr(self._local, "generation", 0) != self._generation:
            for old in (conns or {}).values():
                old.close()
            conns = self._local.conns = {}
            self._local.generation = self._generation
        conn = conns.get(part)
        if conn is not None:
            return conn, True
        parts = urllib.parse.urlsplit(self._url(part))
        source = (self.source_host, 0) if self.source_host else None
        conn = http.client.HTTPConnection(
            parts.hostname, parts.port, timeout=HTTP_TIMEOUT, source_address=source
        )
        conns[part] = conn
        return conn, False

    def close_connections(self) -> None:
        """Close the calling thread's connections (a stream that is done calls this)."""
        for conn in (getattr(self._local, "conns", None) or {}).values():
            conn.close()
        self._local.conns = {}

    def _request(
        self,
        part: int,
        path: str,
        *,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        expect: int | None = None,
    ) -> http.client.HTTPResponse:
        """A response whose status is 2xx (``expect``: that size) with its body unread."""
        url = self._url(part).rstrip("/") + path
        for attempt in (0, 1):
            conn, reused = self._connection(part)
            try:
                conn.request("POST" if body is not None else "GET", path, body, headers or {})
                response = conn.getresponse()
            except (http.client.HTTPException, OSError, ValueError) as exc:
                self._drop(part)
                # The node closed an idle keep-alive connection (or restarted): once more
                # on a new one. A lost batch answer is re-issued later (``want``).
                if reused and attempt == 0 and isinstance(exc, _STALE):
                    continue
                raise exception.StripeError(
                    image_id=self.image_id, url=url, reason=str(exc)
                ) from exc
            if not 200 <= response.status < 300:
                try:
                    detail = response.read(512).decode("utf-8", "replace")
                except (http.client.HTTPException, OSError):
                    detail = ""
                self._drop(part)
                raise exception.StripeError(
                    image_id=self.image_id,
                    url=url,
                    reason=f"HTTP Error {response.status}: {response.reason} {detail}".strip(),
                )
            # (No length: chunked, e.g. from a proxy; the reader counts the bytes instead.)
            if expect is not None and response.length not in (expect, None):
                self._drop(part)
                raise exception.StripeError(
                    image_id=self.image_id,
                    url=url,
                    reason=f"asked for {expect} bytes, got {response.length}",
                )
            return response
        raise AssertionError("unreachable")

    def _read(self, part: int, path: str, **kwargs) -> bytes:
        response = self._request(part, path, **kwargs)
        try:
            data = response.read()
            self._answered(part)
            return data
        except (http.client.HTTPException, OSError, ValueError) as exc:
            self._drop(part)
            raise exception.StripeError(
                image_id=self.image_id, url=self._url(part), reason=str(exc)
            ) from exc

    def _drop(self, part: int) -> None:
        conn = (getattr(self._local, "conns", None) or {}).pop(part, None)
        if conn is not None:
            conn.close()

    def fetch_torrent(self) -> bytes:
        """The .torrent from the first node that answers, another zone's if need be."""
        errors = []
        while True:
            for part in range(len(self.urls)):
                try:
                    return self._read(part, self._path)
                except exception.StripeError as exc:
                    errors.append(str(exc))
                    self.node_failed(part, exc)
                finally:
                    self._drop(part)  # once per fetch: no connection left open for it
            if not self.fall_back():
                raise exception.StripeError(
                    image_id=self.image_id, url=", ".join(self.urls), reason="; ".join(errors)
                )

    def _answered(self, part: int) -> None:
        with self._lock:
            self._answered_at[part] = time.monotonic()

    def fall_back(self) -> bool:
        """Use the next zone's nodes, if any is left: whether the nodes changed."""
        with self._lock:
            if not self._fallback:
                return False
            gone, zone = ", ".join(self.urls), self.urls_zone
            self.urls_zone, self.urls = self._fallback.pop(0)
            self._generation += 1
            self._next_part = 0
            self._dry.clear()
            self._down.clear()
            self._answered_at.clear()
        LOG.warning(
            "Image %s: every origin node of %s (%s) is down or refuses; fetching the "
            "stripes from %s (%s) instead ([torrent_images] cross_zone_fallback)",
            self.image_id,
            f"zone {zone}" if zone else "the image's zone-neutral list",
            gone,
            f"zone {self.urls_zone}" if self.urls_zone else "the zone-neutral list",
            ", ".join(self.urls),
        )
        if self.on_fall_back is not None:
            self.on_fall_back(self.urls_zone)
        return True

    def all_down(self) -> bool:
        """Whether every node failed since it last answered (the origin is gone, or
        restarting) and no other zone's nodes are left to try: the swarm's missing
        pieces are then Glance's to fill in."""
        with self._lock:
            if self._fallback:
                return False
            return all(
                self._down.get(n, -1e18) > self._answered_at.get(n, -1e18)
                for n in range(len(self.urls))
            )

    def live_nodes(self) -> list[int]:
        """The nodes not known to be down; the image is split among these."""
        now = time.monotonic()
        with self._lock:
            return [
                n for n in range(len(self.urls)) if now - self._down.get(n, -1e18) > NODE_DOWN_FOR
            ]

    def node_failed(self, part: int, exc: exception.StripeError) -> bool:
        """Note that node ``part`` failed with ``exc``; whether another node can go on.

        A refused or reset connection (the node died or restarts) takes the node out for
        :data:`NODE_DOWN_FOR` seconds: its part of the image goes to the others. Other
        failures (a busy node's 503) leave it in.
        """
        if isinstance(exc.__cause__, (OSError, EOFError, http.client.HTTPException)):
            with self._lock:
                self._down[part] = time.monotonic()
                self._dry.discard(part)  # the split changes: the others have new pieces
                for other in range(len(self.urls)):
                    self._dry.discard(other)
        return bool(self.live_nodes())

    def next_batch(self, want: list[int] | None = None) -> tuple[int, list[int]] | None:
        """(node, pieces) of the next batch, or None when every live node ran dry.

        The image is split among the live nodes (piece p to live node p % live); a node
        that fails is left out (:meth:`node_failed`) and the next one asked. Raises
        :class:`~nova_torrent_images.exception.StripeError` when no node is left.
        """
        live = self.live_nodes()
        if not live and self.fall_back():
            return self.next_batch(want)
        if not live:
            raise exception.StripeError(
                image_id=self.image_id, url=", ".join(self.urls), reason="every origin node is down"
            )
        for _ in range(len(live)):
            with self._lock:
                index = self._next_part % len(live)
                self._next_part = index + 1
            part = live[index]
            if want is None and part in self._dry:
                continue
            request = {
                "peer": self.peer,
                "part": index,
                "parts": len(live),
                "want": want,
                "batches": BATCHES_PER_REQUEST,
            }
            if self.zone is not None:
                request["zone"] = self.zone
            if want is None and self.have is not None:
                now = time.monotonic()
                if now - self._have_sent_at >= HAVE_EVERY:
                    self._have_sent_at = now
                    have = self.have()
                    if have:
                        request["have"] = pieces_to_bitfield(have)
            body = json.dumps(request).encode()
            try:
                text = self._read(
                    part,
                    self._path + "/stripes",
                    body=body,
                    headers={"Content-Type": "application/json"},
                )
            except exception.StripeError as exc:
                if not self.node_failed(part, exc) and not self._fallback:
                    raise
                LOG.warning("%s; its part of the image goes to the other origin nodes", exc)
                return self.next_batch(want)
            try:
                answer = json.loads(text)
            except ValueError as exc:
                raise exception.StripeError(
                    image_id=self.image_id, url=self._url(part), reason=f"bad answer: {exc}"
                ) from exc
            self._introduce(answer.get("peers") or [])
            fetching = answer.get("fetching")
            if isinstance(fetching, int) and not isinstance(fetching, bool):
                self.others_fetching = fetching
            pieces = [int(p) for p in answer.get("pieces", [])]
            if want is None and answer.get("done"):
                with self._lock:
                    self._dry.add(part)
            if pieces:
                return part, pieces
        return None

    def _introduce(self, peers: list[str]) -> None:
        """Tell the torrent about hosts it has not heard of (the origin names them)."""
        new = []
        with self._lock:
            for text in peers[:100]:
                if text in self._known_peers or text == self.peer:
                    continue
                try:
                    new.append(parse_host_port(str(text)))
                except ValueError:
                    LOG.debug("Ignoring peer %r named by the origin", text)
                    continue
                self._known_peers.add(text)
        if new and self.on_peers is not None:
            self.on_peers(new)

    def fetch_range(self, part: int, start: int, end: int) -> bytearray:
        """Bytes ``start`` to ``end`` (inclusive) of the image from node ``part``."""
        return self.fetch_pieces(part, start, end, end - start + 1)[0]

    def fetch_pieces(
        self,
        part: int,
        start: int,
        end: int,
        piece_length: int,
        allocate: Callable[[int], bytearray] = bytearray,
    ) -> list[bytearray]:
        """Bytes ``start`` to ``end`` (inclusive) in one request, cut every ``piece_length``.

        Read straight into one buffer per piece, which ``add_piece`` takes as it is (it
        refuses a memoryview): no join of the reads and no slicing into pieces, each of
        them another copy of every byte. ``allocate(n)`` gives a buffer of ``n`` bytes.
        """
        length = end - start + 1
        if length < 1 or piece_length < 1:
            raise ValueError(f"no bytes in {start}-{end} (pieces of {piece_length})")
        buffers = [
            allocate(min(piece_length, length - offset))
            for offset in range(0, length, piece_length)
        ]
        response = self._request(
            part, self._path + "/data", headers={"Range": f"bytes={start}-{end}"}, expect=length
        )
        try:
            for buffer in buffers:
                view = memoryview(buffer)
                got = 0
                while got < len(buffer):
                    n = response.readinto(view[got:])
                    if self.downlink is not None and n:
                        self.downlink.take(n)
                    if not n:
                        raise exception.StripeError(
                            image_id=self.image_id,
                            url=self._url(part),
                            reason=f"asked for {length} bytes, the answer ended early",
                        ) from EOFError()  # the node closed the connection: it may be gone
                    got += n
            if response.read(1):
                raise exception.StripeError(
                    image_id=self.image_id,
                    url=self._url(part),
                    reason=f"asked for {length} bytes, got more",
                )
            self._answered(part)
        except (http.client.HTTPException, OSError, ValueError) as exc:
            self._drop(part)
            raise exception.StripeError(
                image_id=self.image_id, url=self._url(part), reason=str(exc)
            ) from exc
        except exception.StripeError:
            self._drop(part)
            raise
        with self._lock:
            self.bytes_by_url[self._url(part)] += length
        return buffers


# Errors of a keep-alive connection the node closed meanwhile: worth one retry.
_STALE = (
    http.client.RemoteDisconnected,
    http.client.BadStatusLine,
    ConnectionResetError,
    ConnectionAbortedError,
    BrokenPipeError,
)


class BufferPool:
    """Piece buffers used again once their bytes are written (or copied) and hashed.

    A new ``bytearray`` of a piece is fresh memory from the kernel: zeroed, then faulted
    in page by page as the answer is read into it. Measured on one host, 512 MiB: 0.44 to
    0.49 CPU-s of system time with a new buffer per piece, where plain HTTP spends 0.27.
    """

    def __init__(self, size: int, limit_bytes: int = 64 * 1024 * 1024) -> None:
        self.size = size
        self._free: list[bytearray] = []
        self._limit = max(1, limit_bytes // size)
        self._lock = threading.Lock()

    def get(self, n: int) -> bytearray:
        if n == self.size:
            with self._lock:
                if self._free:
                    return self._free.pop()
        return bytearray(n)

    def put(self, buffer: bytearray) -> None:
        if len(buffer) == self.size:
            with self._lock:
                if len(self._free) < self._limit:
                    self._free.append(buffer)


class StripeWorker:
    """Fetches this host's stripes into a running torrent, in a thread of its own."""

    def __init__(
        self,
        client: StripeClient,
        *,
        piece_length: int,
        size: int,
        add_piece: Callable[[int, bytes | bytearray], None],
        missing: Callable[[], list[int]],
        progress: Callable[[], int],
        offer: Callable[[int, bytes | bytearray], bool | None] | None = None,
        landing: PieceLanding | None = None,
    ) -> None:
        """``add_piece(piece, data)`` must copy ``data`` (libtorrent's binding does): the
        buffer is used again. ``offer(offset, data)`` returns True when it keeps ``data``
        (the buffer is then not used again). ``landing``: while this host is alone, it writes
        the pieces itself instead of ``add_piece`` (see
        :mod:`nova_torrent_images.swarm.landing`)."""
        self.client = client
        self.piece_length = piece_length
        self.size = size
        pieces = -(-size // piece_length)
        client.have = lambda: sorted(set(range(pieces)).difference(missing()))
        self._add_piece = add_piece
        self._missing = missing  # pieces the torrent still lacks
        self._progress = progress  # bytes the torrent has (to tell a quiet swarm)
        self._offer = offer
        self.landing = landing
        self._pool = BufferPool(piece_length)
        self._holders: dict[int, int] = {}  # id(buffer) -> users left (hash, add/land)
        self._kept: set[int] = set()
        self._holders_lock = threading.Lock()
        self._announcing: threading.Thread | None = None
        self._announce_lock = threading.Lock()
        self.storage_error: OSError | None = None  # writing a landed piece failed
        self._stop = threading.Event()
        self.failed: exception.StripeError | None = None
        self.bytes_fetched = 0
        self._count_lock = threading.Lock()
        # A few batches in flight: one request at a time leaves the link idle for every
        # round trip and every add_piece copy (measured: a single host at 0.33 of HTTP).
        # While landing, one stream: with no add_piece the link stays busy, and the bytes
        # arrive in order for the image hash. 512 MiB, one host, no caps: 1.11 s and 1.13
        # to 1.25 CPU-s with one stream; 1.31-1.34 s and 1.25-1.34 CPU-s with two or three.
        self._landing_over = threading.Event()
        if landing is None:
            self._landing_over.set()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), name=f"stripes-{i}", daemon=True)
            for i in range(STREAMS)
        ]
        # Without a whole-image hash, landed pieces are checked on their v2 roots in the
        # hash thread, so the stream goes on reading meanwhile.
        self._checks = landing is not None and landing.layer is not None and offer is None
        # The image hash (SHA-512, 700-800 MiB/s on one core here) runs in a thread of its
        # own: done by the streams under the check's lock it stalled them in turn. 512 MiB
        # with defaults: median 3.5 s without this thread, 2.55 s with it (5 rounds each).
        self._hash_queue: collections.deque[tuple[int, bytes | bytearray] | None] = (
            collections.deque()
        )
        self._hash_backlog = 0
        self._hash_failed = False
        self._unoffered: set[int] = set()  # pieces queued for the hash, not yet offered
        self._hash_ready = threading.Condition()
        self._hasher = (
            threading.Thread(target=self._hash, name="stripes-hash", daemon=True)
            if offer is not None or self._checks
            else None
        )

    def start(self) -> StripeWorker:
        if self._hasher is not None:
            self._hasher.start()
        for thread in self._threads:
            thread.start()
        return self

    @property
    def origin_down(self) -> bool:
        """Every origin node failed since it last answered (the streams keep asking)."""
        return self.client.all_down()

    @property
    def running(self) -> bool:
        """Whether a stream still fetches (False once every stream ended or failed)."""
        return any(thread.is_alive() for thread in self._threads)

    def stop(self) -> None:
        self._stop.set()
        self._landing_over.set()
        for thread in self._threads:
            thread.join(timeout=HTTP_TIMEOUT + 5)
        if self._announcing is not None:
            self._announcing.join(timeout=HTTP_TIMEOUT + 5)
        if self._hasher is not None:
            # What was fetched is hashed before stop returns: cheaper than reading it back.
            with self._hash_ready:
                self._hash_queue.append(None)
                self._hash_ready.notify_all()
            self._hasher.join(timeout=HTTP_TIMEOUT + 5)
            self._unoffered.clear()

    def _to_hash(self, offset: int, data: bytes | bytearray) -> None:
        with self._hash_ready:
            while self._hash_backlog > HASH_BACKLOG and not self._stop.is_set():
                self._hash_ready.wait(0.5)
            self._hash_queue.append((offset, data))
            # Queued before add_piece: no one reads the piece back while we hold it.
            self._unoffered.add(offset // self.piece_length)
            self._hash_backlog += len(data)
            self._hash_ready.notify_all()

    def _hash(self) -> None:
        qos.lower_thread_priority()
        while True:
            with self._hash_ready:
                while not self._hash_queue:
                    self._hash_ready.wait()
                item = self._hash_queue.popleft()
            if item is None:
                return
            kept = True
            try:
                if self._offer is None:
                    kept = False
                    piece = item[0] // self.piece_length
                    if self._land(piece, item[1]) is None:  # landing stopped meanwhile
                        self._add_piece(piece, item[1])
                elif not self._hash_failed:
                    kept = bool(self._offer(*item))
            except Exception as exc:  # noqa: BLE001  as a stream's failure would be
                self._hash_failed = True
                self.failed = exception.StripeError(
                    image_id=self.client.image_id, url=",".join(self.client.urls), reason=repr(exc)
                )
                LOG.exception("Image %s: hashing stripes failed", self.client.image_id)
            with self._hash_ready:
                self._hash_backlog -= len(item[1])
                self._unoffered.discard(item[0] // self.piece_length)
                self._hash_ready.notify_all()
            self._release(item[1], reuse=not kept)

    def _run(self, stream: int) -> None:
        qos.lower_thread_priority()  # HTTP reads and add_piece copies: below guests
        try:
            if stream:
                self._landing_over.wait()  # the other streams join once landing stops
            while True:
                try:
                    self._fetch_assigned()
                    if not stream:
                        self._landing_over.set()
                        self._fetch_what_went_missing()
                    return
                except exception.StripeError as exc:
                    if self._stop.is_set() or not self.client.all_down():
                        raise
                    # Every node is down (dead, or restarting): ask again once their
                    # time out is over; meanwhile the transfer fills in from Glance.
                    if not stream:
                        LOG.warning(
                            "%s; every origin node is down: asking them again every %.0fs",
                            exc,
                            NODE_DOWN_FOR,
                        )
                    if self._stop.wait(NODE_DOWN_FOR):
                        return
        except exception.StripeError as exc:
            self.failed = exc
            LOG.warning("%s; the swarm (and the origin's BitTorrent port) carry on", exc)
        except Exception as exc:  # noqa: BLE001  never let the thread die silently
            self.failed = exception.StripeError(
                image_id=self.client.image_id, url=",".join(self.client.urls), reason=repr(exc)
            )
            LOG.exception("Image %s: stripe worker failed", self.client.image_id)
        finally:
            self.client.close_connections()

    def _fetch_assigned(self) -> None:
        while not self._stop.is_set():
            batch = self.client.next_batch()
            if self.landing is not None and self.client.others_fetching:
                self.stop_landing("the origin says other hosts fetch this image")
            if batch is None:
                return
            self._fetch(*batch)

    def stop_landing(self, why: str) -> None:
        """Another host needs pieces: stripes go to libtorrent from now on, and so do the
        pieces landed so far (read back, in a thread of their own). Idempotent."""
        if self.landing is None:
            return
        with self._announce_lock:
            if self._announcing is not None or not self.landing.active:
                return
            self._announcing = threading.Thread(
                target=self._announce_landed, args=(why,), name="stripes-announce", daemon=True
            )
            self._announcing.start()
        self._landing_over.set()

    def _announce_landed(self, why: str) -> None:
        qos.lower_thread_priority()
        landing = self.landing
        assert landing is not None
        pieces = landing.stop()
        LOG.info(
            "Image %s: %s; the %d pieces this host landed itself go to the swarm",
            self.client.image_id,
            why,
            len(pieces),
        )
        try:
            for piece in pieces:
                if self._stop.is_set():
                    return
                self._add_piece(piece, landing.read(piece))
        except OSError as exc:
            self.storage_error = exc
            LOG.error("Image %s: reading landed pieces back failed: %s", self.client.image_id, exc)

    def _fetch_what_went_missing(self) -> None:
        last, quiet_since = self._progress(), time.monotonic()
        while not self._stop.wait(0.2):
            missing = self._missing()
            if not missing:
                return
            if self.client.all_down() and not self.client.live_nodes():
                raise exception.StripeError(
                    image_id=self.client.image_id,
                    url=", ".join(self.client.urls),
                    reason="every origin node is down",
                )
            done = self._progress()
            if done != last:
                last, quiet_since = done, time.monotonic()
                continue
            if time.monotonic() - quiet_since < QUIET_BEFORE_ASKING:
                continue
            batch = self.client.next_batch(want=missing)
            if batch is not None:
                LOG.info(
                    "Image %s: the swarm went quiet with %d pieces missing; %d re-issued "
                    "by the origin",
                    self.client.image_id,
                    len(missing),
                    len(batch[1]),
                )
                self._fetch(*batch)
            quiet_since = time.monotonic()

    def awaits_offer(self, piece: int) -> bool:
        """Whether ``piece``'s bytes wait in memory to be offered to the image hash.

        Whoever else hashes finished pieces (the transfer, reading them back) leaves these
        to the worker instead of reading them from disk.
        """
        return piece in self._unoffered

    def _fetch(self, part: int, pieces: list[int]) -> None:
        # Contiguous pieces travel in one range request.
        for run in _runs(sorted(pieces)):
            start = run[0] * self.piece_length
            end = min((run[-1] + 1) * self.piece_length, self.size) - 1
            try:
                buffers = self.client.fetch_pieces(
                    part, start, end, self.piece_length, allocate=self._pool.get
                )
            except exception.StripeError as exc:
                if not self.client.node_failed(part, exc) and not self.client.fall_back():
                    raise
                # Handed out by a node that is gone: another node hands them out again
                # once this host lists them as missing.
                LOG.warning("%s; its part of the image goes to the other origin nodes", exc)
                return
            with self._count_lock:
                self.bytes_fetched += end - start + 1
            for i, (piece, data) in enumerate(zip(run, buffers, strict=True)):
                offset = start + i * self.piece_length
                if self._checks and self.landing.active:
                    self._to_hash(offset, data)  # checked, then landed, by the hash thread
                    continue
                if self._offer is not None:
                    with self._holders_lock:
                        self._holders[id(data)] = 2  # the hash thread and this stream
                    self._to_hash(offset, data)
                if self.landing is None or self._land(piece, data) is None:
                    self._add_piece(piece, data)  # the binding copies it
                self._release(data)
            if self._stop.is_set():
                return

    def _release(self, buffer: bytearray, *, reuse: bool = True) -> None:
        """One user is done with ``buffer``; the last one gives it back to the pool,
        unless a user kept it (the image hash holds bytes that came out of order)."""
        key = id(buffer)
        with self._holders_lock:
            if not reuse:
                self._kept.add(key)
            left = self._holders.get(key, 1) - 1
            if left > 0:
                self._holders[key] = left
                return
            self._holders.pop(key, None)
            kept = key in self._kept
            self._kept.discard(key)
        if not kept:
            self._pool.put(buffer)

    def _land(self, piece: int, data: bytearray) -> bool | None:
        """Write ``piece`` into the destination ourselves; None: hand it to libtorrent."""
        try:
            landed = self.landing.land(piece, data)
        except OSError as exc:
            self.storage_error = exc
            self._stop.set()
            LOG.error("Image %s: writing piece %d failed: %s", self.client.image_id, piece, exc)
            return False
        if landed is False:
            LOG.warning(
                "Image %s: piece %d from the origin's stripes failed its v2 hash check; "
                "it is fetched again",
                self.client.image_id,
                piece,
            )
        return landed


def _runs(pieces: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for p in pieces:
        if runs and runs[-1][-1] == p - 1:
            runs[-1].append(p)
        else:
            runs.append([p])
    return runs
