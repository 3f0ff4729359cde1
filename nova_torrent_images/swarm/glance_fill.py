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

"""Glance fills in what the swarm cannot deliver: only the missing pieces, about once.

When the origin dies (or a swarm stalls), the hosts of a storm between them still hold
most of the image. A :class:`GlanceFill` runs beside the transfer and fetches, with HTTP
``Range`` requests on Glance's ``/v2/images/<id>/file``, only pieces that no connected peer
has, and hands each to libtorrent with ``add_piece``: hash-checked against the torrent
like every piece, then announced, so the other hosts take it from this one.

The hosts share the missing part without talking about it: a piece is this host's to
fetch when this host ranks first for it among itself and its connected peers
(rendezvous hashing on the peers' addresses). Every host sees about the same peers, so
each piece leaves Glance about once; a host that dies drops out of the others' peer lists,
and its pieces become theirs; a host whose peers all vanish fetches everything left.
With ``everything`` (the swarm made no progress for ``stall_timeout``), the fill takes
any missing piece, rank first, as a last resort before giving up.

Nothing Glance sends is trusted more than a peer: libtorrent checks every piece, and the
whole image is checked against Glance's ``os_hash_value`` at the end as always.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable

from oslo_log import log as logging
from oslo_utils import units

from nova_torrent_images import exception
from nova_torrent_images.common import qos
from nova_torrent_images.common.utils import RateLimiter

LOG = logging.getLogger(__name__)

# One request asks for at most this many bytes (whole pieces, at least one): small
# enough that the split by rank keeps hosts apart (their pieces are scattered), large
# enough that a 4 MiB-piece torrent still takes one piece per request.
REQUEST_BYTES = 4 * units.Mi
STREAMS = 2  # requests in flight at once: one request's latency does not idle the link
MAX_FAILURES = 3  # Glance failures in a row before the fill gives up
RETRY_DELAY = 1.0  # seconds, doubled after each failure in a row
IDLE_WAIT = 0.2  # seconds between looks when nothing is this host's to fetch
# libtorrent checks and writes an added piece on its own threads: until then the piece is
# still missing. It is not fetched again unless it is still missing this much later (it
# failed its check: Glance's bytes are not the torrent's, or the write was lost).
ADDED_GRACE = 10.0

# (start, end) inclusive -> the bytes; typed Glance errors on failure.
RangeReader = Callable[[int, int], bytes]


def rank(host: str, piece: int) -> bytes:
    """The rendezvous rank of ``host`` for ``piece``: the highest host fetches it."""
    return hashlib.blake2b(f"{host}/{piece}".encode(), digest_size=8).digest()


class GlanceFill:
    """Fetches this host's share of the pieces nobody has from Glance, in threads of its own."""

    def __init__(
        self,
        image_id: str,
        read_range: RangeReader,
        *,
        piece_length: int,
        size: int,
        add_piece: Callable[[int, bytes], None],
        missing: Callable[[], list[int]],
        availability: Callable[[], list[int]],
        hosts: Callable[[], tuple[str, list[str]]],
        downlink: RateLimiter | None = None,
    ) -> None:
        """``missing()``: pieces the torrent lacks; ``availability()``: per piece, how many
        connected peers have it; ``hosts()``: (this host's address, its peers' addresses),
        as the peers see them; ``downlink``: the host's byte budget for bytes that do not
        pass libtorrent's limiter (``download_rate_limit``)."""
        self.image_id = image_id
        self._read_range = read_range
        self.piece_length = piece_length
        self.size = size
        self._add_piece = add_piece
        self._missing = missing
        self._availability = availability
        self._hosts = hosts
        self._downlink = downlink
        self._lock = threading.Lock()
        self._in_flight: set[int] = set()
        self._added: dict[int, float] = {}  # piece -> when it was handed to libtorrent
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._split_for: tuple[str, frozenset[str]] | None = None
        self._split: dict[int, bytes] = {}  # this host's pieces -> its rank for them
        self.everything = False  # any missing piece, not only those nobody has
        self.paused = False  # the origin is back: nothing is fetched meanwhile
        self.failed: exception.TorrentImagesError | None = None
        self.bytes_fetched = 0
        self.requests = 0

    @property
    def started(self) -> bool:
        return bool(self._threads)

    def start(self, *, everything: bool = False) -> GlanceFill:
        """Start fetching (idempotent); ``everything`` widens a running fill."""
        self.everything = self.everything or everything
        if not self._threads:
            self._threads = [
                threading.Thread(target=self._run, name=f"glance-fill-{i}", daemon=True)
                for i in range(STREAMS)
            ]
            for thread in self._threads:
                thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    # -- choosing ----------------------------------------------------------------------
    def _mine(self, pieces: list[int]) -> list[int]:
        """Of ``pieces``, those this host ranks first for, best first."""
        me, peers = self._hosts()
        key = (me, frozenset(peers))
        with self._lock:
            if key != self._split_for:
                # Worked out once per set of peers (pieces x peers hashes), not per request.
                count = -(-self.size // self.piece_length)
                own = [rank(me, p) for p in range(count)]
                others = [[rank(peer, p) for p in range(count)] for peer in key[1]]
                self._split = {
                    p: own[p] for p in range(count) if all(own[p] > o[p] for o in others)
                }
                self._split_for = key
            split = self._split
        return sorted((p for p in pieces if p in split), key=split.__getitem__, reverse=True)

    def _next_run(self) -> list[int]:
        """The next pieces to fetch in one request (empty: none for now), marked in flight."""
        if self.paused:
            return []
        now = time.monotonic()
        missing = [
            p
            for p in self._missing()
            if p not in self._in_flight and now - self._added.get(p, -1e18) > ADDED_GRACE
        ]
        if not missing:
            return []
        if self.everything:
            candidates = missing
        else:
            have = self._availability()
            candidates = [p for p in missing if p < len(have) and have[p] == 0]
        chosen = self._mine(candidates)
        if not chosen and self.everything:
            # Every peer seems to hold or fetch the rest, and none delivers: rank first.
            me, _ = self._hosts()
            chosen = sorted(candidates, key=lambda p: rank(me, p), reverse=True)
        if not chosen:
            return []
        with self._lock:
            first = next((p for p in chosen if p not in self._in_flight), None)
            if first is None:
                return []
            mine = set(chosen)
            run = [first]
            limit = max(1, REQUEST_BYTES // self.piece_length)
            while len(run) < limit and run[-1] + 1 in mine and run[-1] + 1 not in self._in_flight:
                run.append(run[-1] + 1)
            self._in_flight.update(run)
        return run

    # -- fetching ----------------------------------------------------------------------
    def _run(self) -> None:
        qos.lower_thread_priority()  # HTTP reads and add_piece copies: below guests
        failures = 0
        try:
            while not self._stop.is_set() and self.failed is None:
                run = self._next_run()
                if not run:
                    if not self._missing():
                        return  # complete: libtorrent has every piece
                    self._stop.wait(IDLE_WAIT)
                    continue
                try:
                    self._fetch(run)
                    failures = 0
                except exception.TorrentImagesError as exc:
                    failures += 1
                    if failures >= MAX_FAILURES:
                        self.failed = exc
                        LOG.warning(
                            "Image %s: Glance failed %d times in a row filling in missing "
                            "pieces (%s); the fill stops",
                            self.image_id,
                            failures,
                            exc,
                        )
                        return
                    LOG.info("Image %s: Glance fill: %s; retrying", self.image_id, exc)
                    self._stop.wait(RETRY_DELAY * 2 ** (failures - 1))
                finally:
                    with self._lock:
                        self._in_flight.difference_update(run)
        except Exception as exc:  # noqa: BLE001  never let the thread die silently
            self.failed = exception.TorrentFetchError(
                image_id=self.image_id, reason=f"Glance fill failed: {exc!r}"
            )
            LOG.exception("Image %s: Glance fill failed", self.image_id)

    def _fetch(self, run: list[int]) -> None:
        start = run[0] * self.piece_length
        end = min((run[-1] + 1) * self.piece_length, self.size) - 1
        if self._downlink is not None:
            self._downlink.take(end - start + 1)
        data = self._read_range(start, end)
        self.requests += 1
        if len(data) != end - start + 1:
            raise exception.GlanceError(
                image_id=self.image_id,
                reason=f"asked for bytes {start}-{end}, got {len(data)} bytes",
            )
        with self._lock:
            self.bytes_fetched += len(data)
        view = memoryview(data)
        for i, piece in enumerate(run):
            if self._stop.is_set():
                return
            chunk = view[i * self.piece_length : (i + 1) * self.piece_length]
            self._add_piece(piece, bytes(chunk))  # libtorrent checks it against the torrent
            self._added[piece] = time.monotonic()
