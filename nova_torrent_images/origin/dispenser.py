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

"""Who gets which piece: the origin's dispenser of disjoint stripes, per image and zone.

Every compute host asks for the next batch of pieces nobody of its zone has been given
yet (:meth:`StripeDispenser.assign`), fetches exactly those bytes from the stripe server
(:mod:`.stripe_server`, the HTTP side) and the swarm trades the rest, so the origin sends
each piece about once per zone. Pieces a host took and never fetched, or that a host
that died held, are handed out again; what one client may hold is bounded. Each answer
names other hosts of the zone that asked lately (:meth:`StripeDispenser.peers`).

The dispenser keeps no state on disk: a restarted node starts empty and learns what the
hosts hold from the bitfields they send (``have``).
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from oslo_log import log as logging

from nova_torrent_images.common import utils
from nova_torrent_images.origin.registry import PublishedImage, Registry
from nova_torrent_images.swarm.torrent import describe

LOG = logging.getLogger(__name__)

MAX_PEERS = 50  # other hosts named in one answer
MAX_PEER_RECORDS = 4096  # hosts (addresses) remembered per image
# Zones other than the node's own with a hand-out record of their own, per image; a client
# may name any zone, so their number is bounded (further zones share one record).
MAX_ZONE_RECORDS = 16
OTHER_ZONES = "*"
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


def _address_of(endpoint: str | None) -> str | None:
    """The IP address of ``address:port`` (IPv4-mapped IPv6 as IPv4), or None."""
    if not endpoint:
        return None
    try:
        return normal_address(utils.parse_host_port(endpoint)[0])
    except ValueError:
        return None


def normal_address(address: str) -> str:
    """``address`` as one text per host: IPv4-mapped IPv6 (a dual-stack socket) as IPv4."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


@dataclass
class PeerRecord:
    """A host that asked for an image's stripes, as other hosts are told about it."""

    endpoint: str  # its BitTorrent endpoint: the address it asked from, its own port
    seen: float  # when it last asked
    fetched: int = 0  # bytes of ranges it was sent whole since: it makes progress


@dataclass
class ImageStripes:
    """Who was given which piece of one image, and when."""

    entry: PublishedImage
    torrent: bytes
    piece_length: int
    num_pieces: int
    given_at: dict[int, float] = field(default_factory=dict)  # piece -> last hand-out
    served: int = 0  # payload bytes sent
    # Hosts that asked for stripes, one record per address: they keep off the origin's
    # BitTorrent port, so the origin cannot introduce them to each other there.
    peers: dict[str, PeerRecord] = field(default_factory=dict)  # IP address -> record
    # Who holds what (client addresses): a piece is claimed once a data request for it
    # arrived; see StripeDispenser.assign for what happens to pieces never claimed.
    given_to: dict[int, str] = field(default_factory=dict)  # piece -> last given to
    unclaimed: dict[str, set[int]] = field(default_factory=dict)  # address -> pieces
    reading: Counter[str] = field(default_factory=Counter)  # data responses in flight
    last_read: dict[str, float] = field(default_factory=dict)  # address -> last one's end
    struck: dict[str, float] = field(default_factory=dict)  # address -> no hand-outs until
    # Hosts of other zones (StripeDispenser.for_zone): a hand-out record per zone, kept by
    # the record of the node's own zone, and the zone each address last asked for.
    zone: str | None = None
    zones: dict[str, ImageStripes] = field(default_factory=dict)
    zone_of: dict[str, str] = field(default_factory=dict)

    def served_total(self) -> int:
        """Payload bytes sent to the hosts of every zone."""
        return self.served + sum(z.served for z in list(self.zones.values()))


class StripeDispenser:
    """Hands out disjoint batches of pieces per image; re-issues what went missing."""

    def __init__(
        self,
        registry: Registry,
        *,
        batch_bytes: int,
        reissue_after: float,
        held_bytes: int = 0,
        zone: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``zone``: this node's (``origin_zone``); hosts that name another are handed
        out pieces apart (:meth:`for_zone`)."""
        self.registry = registry
        self.zone = zone
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

    def for_zone(self, stripes: ImageStripes, zone: str | None, address: str) -> ImageStripes:
        """The hand-out record of the hosts of ``zone`` (None: this node's own zone).

        Each zone is given every piece once and its hosts are named only to each other: a
        zone that takes its copy from this node (its own origin nodes are down, or it has
        none) gets the whole image here once and trades within itself, rather than only
        the pieces no host of this zone was given, which its hosts could then get only
        across zones. At most :data:`MAX_ZONE_RECORDS` zones have records of their own;
        further ones share one.
        """
        if zone is None or zone == self.zone:
            with self._lock:
                stripes.zone_of.pop(address, None)
            return stripes
        with self._lock:
            record = stripes.zones.get(zone)
            if record is None:
                if len(stripes.zones) >= MAX_ZONE_RECORDS:
                    zone = OTHER_ZONES
                    record = stripes.zones.get(zone)
                if record is None:
                    record = ImageStripes(
                        stripes.entry,
                        stripes.torrent,
                        stripes.piece_length,
                        stripes.num_pieces,
                        zone=zone,
                    )
                    stripes.zones[zone] = record
            stripes.zone_of[address] = zone
            if len(stripes.zone_of) > MAX_PEER_RECORDS:
                stripes.zone_of.pop(next(iter(stripes.zone_of)))
            return record

    def for_address(self, stripes: ImageStripes, address: str) -> ImageStripes:
        """The hand-out record the client at ``address`` last asked stripes from."""
        with self._lock:
            zone = stripes.zone_of.get(address)
            return stripes.zones.get(zone, stripes) if zone is not None else stripes

    def peers(
        self, stripes: ImageStripes, peer: str | None, *, address: str | None = None
    ) -> list[str]:
        """Other hosts that asked for this image's stripes lately; records ``peer``.

        ``peer`` is the asking host's BitTorrent endpoint, ``address:port``, its address
        the one its request came from (the server checks that): one record per address,
        so a client naming thousands of endpoints is one entry (25,682 requests with a
        different ``peer`` each once filled every host's list with 50 fake ones). Hosts
        that were sent ranges whole since they asked come first, the most recent first:
        the list favours hosts seen to make progress over hosts that only asked.
        ``address``: the asking client's, left out of the list (it may name no peer).
        """
        now = self._clock()
        own = address or _address_of(peer)
        with self._lock:
            if peer and own and own == _address_of(peer):
                record = stripes.peers.get(own)
                if record is None:
                    stripes.peers[own] = PeerRecord(peer, now)
                    if len(stripes.peers) > MAX_PEER_RECORDS:
                        self._forget_one(stripes, own)
                else:
                    record.endpoint, record.seen = peer, now
            for stale in [a for a, r in stripes.peers.items() if now - r.seen >= PEER_TTL]:
                del stripes.peers[stale]
            named = sorted(
                (r for a, r in stripes.peers.items() if a != own),
                key=lambda r: (r.fetched == 0, -r.seen),
            )
        return [r.endpoint for r in named[:MAX_PEERS]]

    @staticmethod
    def _forget_one(stripes: ImageStripes, keep: str) -> None:
        """Drop the least useful record but ``keep``'s (the lock is held): one that made
        no progress before one that did, the oldest first."""
        worst = min(
            (a for a in stripes.peers if a != keep),
            key=lambda a: (stripes.peers[a].fetched > 0, stripes.peers[a].seen),
        )
        del stripes.peers[worst]

    def fetching(
        self, stripes: ImageStripes, peer: str | None, *, address: str | None = None
    ) -> int:
        """How many hosts other than ``peer`` (at ``address``) asked for this image's
        stripes lately.

        A host told none lands its stripes itself (swarm/landing.py) until one shows up.
        """
        now = self._clock()
        own = address or _address_of(peer)
        with self._lock:
            return sum(
                1 for a, r in stripes.peers.items() if a != own and now - r.seen < ACTIVE_WINDOW
            )

    def assign(
        self,
        stripes: ImageStripes,
        *,
        part: int,
        parts: int,
        want: list[int] | None = None,
        batches: int = 1,
        address: str = "",
        have: list[int] | None = None,
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

        ``have``: pieces the client holds. Those nobody was given count as given now: a
        node that restarted (or a zone that just turned to it) hands out only what no host
        has. A client that lies delays those pieces by ``reissue_after``, as one that
        never fetches what it took does.
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
            for p in have or ():
                given.setdefault(p, now)
            if want is None:
                free = [p for p in range(part, stripes.num_pieces, parts) if p not in given]
                hosts = max(
                    1, sum(1 for r in stripes.peers.values() if now - r.seen < ACTIVE_WINDOW)
                )
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
                record = stripes.peers.get(address)
                if record is not None:  # progress: named before hosts that only asked
                    record.fetched += end - start + 1
                return
            for p in self._whole_pieces(stripes, start, end):
                if stripes.given_to.get(p) == address:
                    del stripes.given_to[p]
                    stripes.given_at.pop(p, None)
            # Gone, or too slow to read: the swarm serves it better than new hand-outs.
            stripes.struck[address] = now + STRIKE_PERIODS * self.reissue_after
