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

"""One swarm download: join by magnet, write straight into the destination, watch it.

The transfer adds the torrent in upload mode, checks the metadata against the Glance record
(one file, the image's size) before any piece is requested, then lets it download. It fails
with a typed error on metadata, stall and overall timeouts or storage errors; a failed
transfer removes the torrent from the session before raising, so no late write can reach
the destination after the caller starts cleaning up or falling back. A finished one stays
in the swarm, serving its pieces, while the caller verifies the image, until
:meth:`Transfer.leave`: a host that will not seed first hands over the pieces no other
connected host has (the origin's stripes it fetched), so the others need not wait for the
origin to send them again. Whatever else a hostile
torrent names (more files, directories) lands in a scratch directory of the transfer's own,
removed with it. Peer hints are resolved once, in bounded time counted against
``metadata_timeout``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import shutil
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field

import libtorrent as lt
from oslo_config import cfg
from oslo_log import log as logging
from oslo_utils import units

from nova_torrent_images import exception
from nova_torrent_images.common import qos, utils
from nova_torrent_images.glance import verify
from nova_torrent_images.glance.image import ImageInfo
from nova_torrent_images.glance.zones import (
    ZONE_PROPERTY_PREFIX,
    ZoneRoute,
    foreign_hints,
    image_routes,
    plan,
)
from nova_torrent_images.swarm import recipes
from nova_torrent_images.swarm.engine import AlertEvent, SwarmEngine, TorrentWatch
from nova_torrent_images.swarm.glance_fill import GlanceFill, RangeReader
from nova_torrent_images.swarm.landing import PieceLanding
from nova_torrent_images.swarm.merkle import PieceLayer
from nova_torrent_images.swarm.stripe_client import StripeClient, StripeWorker, parse_stripe_urls
from nova_torrent_images.swarm.torrent import content_file_sizes, describe

LOG = logging.getLogger(__name__)

POLL_INTERVAL = 0.2
FLUSH_TIMEOUT = 60.0
# Peer hints are resolved in parallel, each lookup given at most this long (and never more
# than the metadata timeout): a slow DNS server must not hold a download slot for long.
RESOLVE_TIMEOUT = 5.0
# How long a finished host that will not seed stays to hand over pieces that connected
# hosts still lack. Measured (bench, 4 hosts, 64 MiB): hosts leaving at once with their
# last stripes made the last host wait 8.5 s on the origin's re-issue path; a piece crosses
# loopback in milliseconds, so a few seconds is plenty and bounds the cost.
SHARE_LIMIT = 3.0
# How often the image hash catches up on pieces libtorrent has finished and checked.
READ_BEHIND_INTERVAL = 0.1
# How long a transfer waits for the origin's BitTorrent peer (at the start, or after every
# stripe server failed) before it calls the origin gone: a live origin's port connects
# within a second on a datacenter network; a dead one's refuses at once.
ORIGIN_GRACE = 3.0


_CHECKING = (
    lt.torrent_status.states.checking_files,
    lt.torrent_status.states.checking_resume_data,
    lt.torrent_status.states.queued_for_checking,
    lt.torrent_status.states.allocating,
)


@dataclass(frozen=True)
class TransferSettings:
    """The options a transfer uses, read once from ``[torrent_images]``."""

    metadata_timeout: float
    stall_timeout: float
    overall_timeout: float
    progress_interval: float
    trackers: tuple[str, ...]
    scratch_root: str  # transfers' scratch directories live under it
    use_origin_stripes: bool = True
    stripes_property: str = "torrent_stripes"
    land_stripes: bool = True
    allowed_peer_cidrs: tuple[str, ...] = ()
    zone: str | None = None
    cross_zone_fallback: bool = True

    @classmethod
    def from_conf(cls, conf: cfg.ConfigOpts) -> TransferSettings:
        opts = conf.torrent_images
        return cls(
            metadata_timeout=opts.metadata_timeout,
            stall_timeout=opts.stall_timeout,
            overall_timeout=opts.overall_timeout,
            progress_interval=opts.progress_interval,
            trackers=tuple(opts.trackers),
            scratch_root=os.path.join(opts.state_dir, "scratch"),
            use_origin_stripes=opts.use_origin_stripes,
            stripes_property=opts.stripes_property,
            land_stripes=opts.land_stripes,
            allowed_peer_cidrs=tuple(opts.allowed_peer_cidrs),
            zone=(opts.zone or "").strip() or None,
            cross_zone_fallback=opts.cross_zone_fallback,
        )


@dataclass
class SwarmStats:
    """Where the bytes of a swarm download came from."""

    bytes_total: int = 0
    bytes_from_origin: int = 0  # origin seeders named by x.pe, and web seeds
    bytes_from_peers: int = 0  # every other peer: other compute hosts
    bytes_from_stripes: int = 0  # of bytes_from_origin: the origin's stripes over HTTP
    bytes_landed: int = 0  # of bytes_from_stripes: written by this host, not libtorrent
    bytes_from_glance: int = 0  # missing pieces Glance filled in (swarm/glance_fill.py)
    glance_fill_reason: str | None = None  # why the fill started, if it did
    peers_seen: int = 0
    hash_failures: int = 0
    peers_banned: int = 0  # peers libtorrent banned or refused (peer_ban/blocked)
    seconds: float = 0.0
    per_peer: dict[str, int] = field(default_factory=dict)
    # Payload bytes per origin stripe server URL, and the zone whose servers delivered
    # ("" for the image's zone-neutral list; None when no stripes were fetched).
    per_stripe_server: dict[str, int] = field(default_factory=dict)
    stripes_zone: str | None = None


# Called on every poll with (bytes done, bytes wanted, payload rate B/s, connected peers).
ProgressCallback = Callable[[int, int, int, int], None]


def resolve_peers(peers: tuple[tuple[str, int], ...], timeout: float) -> list[tuple[str, int]]:
    """IP endpoints of ``peers`` (IP literals pass as they are), within ``timeout`` seconds.

    Names are looked up in parallel; a name that fails or is too slow is skipped with a
    warning. The caller never waits longer than ``timeout`` whatever the DNS server does.
    """
    resolved: dict[int, tuple[str, int]] = {}
    names = []
    for index, (host, port) in enumerate(peers):
        if utils.is_ip_literal(host):
            resolved[index] = (host, port)
        else:
            names.append((index, host, port))
    if names:
        pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=min(8, len(names)), thread_name_prefix="peer-hint-dns"
        )
        futures = {
            pool.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM): (i, host, port)
            for i, host, port in names
        }
        done, pending = concurrent.futures.wait(futures, timeout=timeout)
        # Lookups still running are abandoned; their threads end when getaddrinfo returns.
        pool.shutdown(wait=False, cancel_futures=True)
        for future in done:
            index, host, port = futures[future]
            try:
                infos = future.result()
            except OSError as exc:
                LOG.warning("Peer hint %s:%s does not resolve (%s); skipping it", host, port, exc)
                continue
            if infos:
                resolved[index] = (infos[0][4][0], port)
        for future in pending:
            _, host, port = futures[future]
            LOG.warning(
                "Peer hint %s:%s did not resolve within %.1fs; skipping it", host, port, timeout
            )
    return [resolved[i] for i in sorted(resolved)]


def remove_stale_scratch(root: str) -> int:
    """Remove scratch directories of transfers whose process died (at start-up)."""
    removed = 0
    with contextlib.suppress(FileNotFoundError):
        for entry in os.listdir(root):
            pid = entry.partition("-")[0]
            if pid.isdigit() and not utils.pid_alive(int(pid)):
                shutil.rmtree(os.path.join(root, entry), ignore_errors=True)
                removed += 1
    return removed


def peers_lacking_ours(handle: lt.torrent_handle) -> int:
    """How many connected peers lack a piece we have (peers whose bitfield is not known
    yet do not count)."""
    ours = utils.native_call(handle.status, lt.torrent_handle.query_pieces).pieces
    lacking = 0
    for peer in utils.native_call(handle.get_peer_info):
        theirs = peer.pieces
        if len(theirs) != len(ours) or peer.flags & lt.peer_info.seed:
            continue
        if any(have and not held for have, held in zip(ours, theirs, strict=True)):
            lacking += 1
    return lacking


class Transfer:
    """Download ``image`` from its swarm into ``destination`` (a new file or a device)."""

    def __init__(
        self,
        engine: SwarmEngine,
        image: ImageInfo,
        destination: str,
        settings: TransferSettings,
        progress: ProgressCallback | None = None,
        check: verify.StreamingCheck | None = None,
        fill_reader: RangeReader | None = None,
    ) -> None:
        """``check`` gets every byte that arrives in order (the origin's stripes).

        ``fill_reader(start, end)``: byte ranges of the image from Glance. With it, a swarm
        that lost its origin (or stalls) keeps every piece it has and fills in only the
        missing ones from Glance (:mod:`nova_torrent_images.swarm.glance_fill`).
        """
        if image.magnet is None:
            raise exception.NotTorrentable(image_id=image.id, reason="it has no magnet")
        image.require_verifiable()
        self.engine = engine
        self.image = image
        self.magnet = image.magnet
        self.destination = os.path.abspath(destination)
        self.opts = settings
        self.routes, foreign = self._plan_routes()
        # The swarm's rendezvous: the first route's (the host's zone's, when the image has
        # one) and the magnet's, less what only other zones' properties name; other zones
        # are reached through their stripes, or as the first route when the host's zone
        # has none.
        first = self.routes[0] if self.routes else ZoneRoute(None)
        trackers = [t for t in self.magnet.trackers if t not in foreign[0]]
        self.trackers = tuple(dict.fromkeys([*first.trackers, *trackers, *settings.trackers]))
        peers = [p for p in self.magnet.peers if p not in foreign[1]]
        self.peer_hints = tuple(dict.fromkeys([*first.peers, *peers]))
        self.stats = SwarmStats()
        self.progress = progress
        self._origin_hosts: set[str] = set()
        self._watch: TorrentWatch | None = None
        self.resume_data: bytes | None = None
        self.check = check
        self._stripes: StripeWorker | None = None
        self._pending_stripes: StripeClient | None = None
        self._landing: PieceLanding | None = None
        self._layer: PieceLayer | None = None  # the v2 piece layer of the origin's torrent
        self._excluded: list[str] = []
        self._peers: list[tuple[str, int]] = []
        self._scratch: str | None = None
        self._read_behind: threading.Thread | None = None
        self._stop_reading = threading.Event()
        self._fill_reader = fill_reader
        self._fill: GlanceFill | None = None
        self._stripe_hosts: set[str] = set()
        # When the origin last delivered or was connected (None: never yet, so a slow
        # start is stall_timeout's to judge, not a dead origin).
        self._origin_seen: float | None = None

    # -- setup -------------------------------------------------------------------------
    def _plan_routes(self) -> tuple[list[ZoneRoute], tuple[set[str], set[tuple[str, int]]]]:
        """The image's routes in the order this host uses them, and the magnet's hints
        that only other zones' routes name (glance/zones.py)."""
        routes = image_routes(self.image.properties, self.opts.stripes_property)
        for key, why in sorted(routes.unusable.items()):
            LOG.warning("Image %s: property %s is not usable (%s)", self.image.id, key, why)
        order = plan(routes, self.opts.zone, cross_zone=self.opts.cross_zone_fallback)
        if self.opts.zone and routes.by_zone and self.opts.zone not in routes.by_zone:
            LOG.warning(
                "Image %s: no origin node of zone %s serves it (no property %s); %s",
                self.image.id,
                self.opts.zone,
                ZONE_PROPERTY_PREFIX + self.opts.zone,
                f"using {', '.join(str(r.zone or 'zone-neutral') for r in order)}"
                if order
                else "cross_zone_fallback is off: the swarm and Glance only",
            )
        return order, foreign_hints(routes, self.opts.zone)

    def _params(
        self, scratch_dir: str, peers: list[tuple[str, int]], torrent: bytes | None
    ) -> lt.add_torrent_params:
        return recipes.download_params(
            self.magnet,
            name=self.image.id,
            destination=self.destination,
            scratch_dir=scratch_dir,
            trackers=list(self.trackers),
            peers=peers,
            torrent=torrent,
        )

    def _stripe_client(self) -> tuple[StripeClient, bytes] | None:
        """The origin's stripes for this image and its .torrent, when they can be used."""
        if not self.opts.use_origin_stripes:
            return None
        tiers: list[tuple[str | None, tuple[str, ...]]] = []
        for route in self.routes:
            if not route.stripes:
                continue
            try:
                tiers.append(
                    (
                        route.zone,
                        parse_stripe_urls(",".join(route.stripes), self.opts.allowed_peer_cidrs),
                    )
                )
            except ValueError as exc:
                LOG.warning(
                    "Image %s: the stripe servers of %s are not usable (%s)",
                    self.image.id,
                    f"zone {route.zone}"
                    if route.zone
                    else f"property {self.opts.stripes_property}",
                    exc,
                )
        if not tiers:
            return None
        host = self.engine.listen_host()
        listen = f"{host}:{self.engine.listen_port}"
        source = host if utils.is_specific_ip(host) else None
        client = StripeClient(
            self.image.id,
            tiers[0][1],
            self.magnet.best_hash,
            listen,
            source,
            downlink=self.engine.stripe_downlink,
            zone=self.opts.zone,
            urls_zone=tiers[0][0],
            fallback=tuple(tiers[1:]),
        )
        client.on_fall_back = self._fell_back
        try:
            torrent = client.fetch_torrent()
            meta = describe(torrent)
        except (exception.StripeError, ValueError) as exc:
            LOG.warning("Image %s: no torrent from the origin's stripes (%s)", self.image.id, exc)
            return None
        for ours, theirs in (
            (self.magnet.info_hash_v1, meta.info_hash_v1),
            (self.magnet.info_hash_v2, meta.info_hash_v2),
        ):
            if ours and ours != theirs:
                LOG.warning(
                    "Image %s: the origin's torrent is not the magnet's (%s, not %s); "
                    "stripes not used",
                    self.image.id,
                    theirs,
                    ours,
                )
                return None
        if self.check is None and self.opts.land_stripes:
            # Without a whole-image hash a landed piece is checked on its own v2 root.
            try:
                self._layer = PieceLayer.from_torrent(torrent)
            except ValueError as exc:
                LOG.info("Image %s: stripes go to libtorrent: %s", self.image.id, exc)
        return client, torrent

    def _landing_for(self, status: lt.torrent_status, piece_length: int) -> PieceLanding | None:
        """Land the stripes here when no host needs pieces from this one, and it is safe.

        Safe: each landed byte is checked either by the whole-image hash (``check``) or
        by its piece's v2 root (``_layer``); without either, libtorrent checks them.
        """
        if not self.opts.land_stripes or (self.check is None and self._layer is None):
            return None
        if status.num_peers > status.num_seeds:
            return None  # a host that lacks pieces is connected already
        return PieceLanding(
            self.destination, piece_length=piece_length, size=self.image.size, layer=self._layer
        )

    def _start_stripes(self, client: StripeClient, status: lt.torrent_status) -> None:
        handle = self._watch.handle
        info = handle.torrent_file()
        self._landing = landing = self._landing_for(status, info.piece_length())
        allowed = self.engine.allows_peer

        def introduce(peers: list[tuple[str, int]]) -> None:
            for endpoint in peers:
                if allowed(endpoint[0]):
                    handle.connect_peer(endpoint)

        client.on_peers = introduce
        self._stripes = StripeWorker(
            client,
            piece_length=info.piece_length(),
            size=self.image.size,
            add_piece=lambda piece, data: utils.native_call(handle.add_piece, piece, data, 0),
            missing=self._missing_pieces,
            progress=lambda: self._done_bytes(utils.native_call(handle.status)),
            offer=self.check.offer if self.check is not None else None,
            landing=landing,
        ).start()
        LOG.info(
            "Image %s: fetching this host's stripes from %s%s; the origin's BitTorrent "
            "port is left to other clients",
            self.image.id,
            ", ".join(client.urls),
            " and writing them itself while no other host needs pieces"
            if landing is not None
            else "",
        )

    def _missing_pieces(self) -> list[int]:
        """Pieces neither libtorrent nor this host's landing has."""
        handle = self._watch.handle
        pieces = utils.native_call(handle.status, lt.torrent_handle.query_pieces).pieces
        landed = self._landing.landed() if self._landing is not None else ()
        return [i for i, have in enumerate(pieces) if not have and i not in landed]

    # -- Glance fills in what the swarm cannot deliver ----------------------------------
    def _fill_hosts(self) -> tuple[str, list[str]]:
        """This host's address and its downloading peers', as each side sees them."""
        me = self.engine.listen_host()
        peers = []
        origin = self._origin_hosts | self._stripe_hosts
        for peer in utils.native_call(self._watch.handle.get_peer_info):
            if not utils.is_specific_ip(me):
                me = peer.local_endpoint[0]
            if peer.flags & lt.peer_info.seed or peer.ip[0] in origin:
                continue
            peers.append(peer.ip[0])
        return me, peers

    def _origin_gone(self, now: float) -> str | None:
        """Why the origin is gone, or None while it may still deliver."""
        stripes = self._stripes
        if stripes is not None and not (
            stripes.origin_down or (stripes.failed is not None and not stripes.running)
        ):
            return None
        if self._pending_stripes is not None:
            return None
        origin = self._origin_hosts | self._stripe_hosts
        if not origin:
            return None  # no origin named: stall_timeout alone decides
        peers = utils.native_call(self._watch.handle.get_peer_info)
        connected = {peer.ip[0] for peer in peers}
        if origin & connected:
            self._origin_seen = now
            return None
        if self._origin_seen is None or now - self._origin_seen < ORIGIN_GRACE:
            return None
        why = f"the origin's BitTorrent peer ({', '.join(sorted(origin))}) is not connected"
        if stripes is not None:
            why = f"every origin stripe server failed ({stripes.failed}) and {why}"
        return why

    def _start_fill(self, why: str, *, everything: bool) -> bool:
        """Fill in the missing pieces from Glance; False when there is no Glance to ask."""
        if self._fill_reader is None:
            return False
        handle = self._watch.handle
        if self._fill is None:
            info = handle.torrent_file()
            self._fill = GlanceFill(
                self.image.id,
                self._fill_reader,
                piece_length=info.piece_length(),
                size=self.image.size,
                add_piece=lambda piece, data: utils.native_call(handle.add_piece, piece, data, 0),
                missing=self._missing_pieces,
                availability=lambda: utils.native_call(handle.piece_availability),
                hosts=self._fill_hosts,
                downlink=self.engine.stripe_downlink,
            )
            self.stats.glance_fill_reason = why
        elif everything and self._fill.everything:
            return False  # filling everything already: a stall now is a real one
        missing = self._missing_pieces()
        available = utils.native_call(handle.piece_availability)
        nobody = [p for p in missing if p < len(available) and available[p] == 0]
        _, peers = self._fill_hosts()
        piece_length = self._fill.piece_length
        LOG.warning(
            "Image %s: %s; %d MiB of it still missing, %d MiB on no connected peer: this "
            "host fetches %s from Glance (shared with %d peers by piece), the swarm the rest",
            self.image.id,
            why,
            len(missing) * piece_length // units.Mi,
            len(nobody) * piece_length // units.Mi,
            "any missing piece" if everything else "its share of those",
            len(peers),
        )
        self._fill.start(everything=everything)
        return True

    def _unknown_landed(self, status: lt.torrent_status) -> int:
        """Bytes landed here that libtorrent does not have (it never saw them)."""
        landing = self._landing
        if landing is None or not landing.bytes_landed:
            return 0
        pieces = status.pieces
        if len(pieces) != self._watch.handle.torrent_file().num_pieces():
            query = lt.torrent_handle.query_pieces
            pieces = utils.native_call(self._watch.handle.status, query).pieces
        length = landing.piece_length
        return sum(
            min(length, self.image.size - p * length) for p in landing.landed() if not pieces[p]
        )

    def _done_bytes(self, status: lt.torrent_status) -> int:
        return status.total_wanted_done + self._unknown_landed(status)

    def _start_read_behind(self) -> None:
        self._read_behind = threading.Thread(
            target=self._catch_up_loop, name=f"read-behind-{self.image.id}", daemon=True
        )
        self._read_behind.start()

    def _stop_read_behind(self) -> None:
        self._stop_reading.set()
        if self._read_behind is not None:
            self._read_behind.join()

    def _catch_up_loop(self) -> None:
        """Feed the image hash the pieces libtorrent finished, while the download runs.

        Only pieces that passed their torrent hash check are read, in order from the
        hashed prefix, so what is hashed is what the destination keeps; the whole-image
        check at the end reads only what is left.
        """
        qos.lower_thread_priority()  # a hash over page-cache reads: below guests
        handle = self._watch.handle
        info = handle.torrent_file()
        piece_length, count = info.piece_length(), info.num_pieces()

        def stripes_hold(piece: int) -> bool:  # bytes on their way to the hash already
            return self._stripes is not None and self._stripes.awaits_offer(piece)

        try:
            while not self._stop_reading.wait(READ_BEHIND_INTERVAL):
                # One query for the bitfield, not a call per piece (each waits for
                # libtorrent's network thread; under eventlet, on the hub).
                query = lt.torrent_handle.query_pieces
                have = utils.native_call(handle.status, query).pieces

                def final(piece: int, have=have) -> bool:  # checked by libtorrent, or landed
                    return bool(have[piece]) or (
                        self._landing is not None and self._landing.has(piece)
                    )

                piece = self.check.streamed // piece_length
                while piece < count and final(piece) and not stripes_hold(piece):
                    piece += 1
                upto = min(piece * piece_length, self.image.size)
                if upto > self.check.streamed:
                    self.check.catch_up(self.destination, upto)
        except Exception:  # noqa: BLE001  the check at the end reads whatever is left
            LOG.exception(
                "Image %s: hashing finished pieces during the download failed; the "
                "whole-image check reads them at the end",
                self.image.id,
            )

    def _fell_back(self, zone: str | None) -> None:
        """The stripes come from ``zone``'s nodes now (the host's own are down).

        The swarm stays the host's zone's: the other zone's node hands this zone every
        piece once and names only this zone's hosts (origin/stripe_server.py), so one
        copy crosses. Only a host with no tracker nor seeder of its own joins that
        zone's swarm too.
        """
        self.stats.stripes_zone = zone or ""
        if self.trackers or self.peer_hints:
            return
        route = next((r for r in self.routes if r.zone == zone), None)
        if route is None:
            return
        self.trackers, self.peer_hints = route.trackers, route.peers
        watch = self._watch
        if watch is None:
            return  # not joined yet: _params takes them
        for url in route.trackers:
            watch.handle.add_tracker({"url": url})
        for host, port in resolve_peers(route.peers, RESOLVE_TIMEOUT):
            watch.handle.connect_peer((host, port))

    def _stripes_failed(self) -> None:
        """The stripes broke: the origin's BitTorrent port is welcome again."""
        self._origin_seen = time.monotonic()  # the grace for its port to connect
        self.engine.include_peers(self._excluded)
        self._excluded = []
        for endpoint in self._peers:
            self._watch.handle.connect_peer(endpoint)

    def _check_metadata(self) -> None:
        info = self._watch.handle.torrent_file()
        sizes = content_file_sizes(info)  # a v2 torrent's tail pad file is no content
        first_is_content = not info.layout().file_flags(0) & lt.file_storage.flag_pad_file
        if len(sizes) != 1 or not first_is_content:
            raise exception.TorrentMismatch(
                image_id=self.image.id,
                reason=f"it has {len(sizes)} files, an image torrent has exactly one",
            )
        if sizes[0] != self.image.size:
            raise exception.TorrentMismatch(
                image_id=self.image.id,
                reason=f"its file is {sizes[0]} bytes, Glance says the image is "
                f"{self.image.size} bytes",
            )
        LOG.info(
            "Image %s: torrent metadata received (%d pieces of %d KiB); downloading into %s",
            self.image.id,
            info.num_pieces(),
            info.piece_length() // 1024,
            self.destination,
        )
        self._watch.handle.unset_flags(lt.torrent_flags.upload_mode)

    # -- the loop ----------------------------------------------------------------------
    def run(self) -> SwarmStats:
        """Download the image; on success the torrent stays in the swarm until :meth:`leave`."""
        start = time.monotonic()
        peers = resolve_peers(self.peer_hints, min(RESOLVE_TIMEOUT, self.opts.metadata_timeout))
        self._origin_hosts = {host for host, _ in peers}
        # A destination this transfer creates is removed again if it fails: libtorrent may
        # create it (empty) when a hostile torrent's zero-length file comes first.
        created = not os.path.lexists(self.destination)
        os.makedirs(self.opts.scratch_root, exist_ok=True)
        self._scratch = os.path.join(self.opts.scratch_root, f"{os.getpid()}-{time.monotonic_ns()}")
        os.mkdir(self._scratch, 0o700)
        self._peers = peers
        stripes = self._stripe_client()
        self._pending_stripes = stripes[0] if stripes else None
        if stripes is not None:
            # This host takes its share from the origin over HTTP and the rest from other
            # hosts; the origin's BitTorrent port would only send duplicates.
            self._stripe_hosts = {
                urllib.parse.urlsplit(url).hostname or "" for url in stripes[0].urls
            }
            self._excluded = self.engine.exclude_peers(self._stripe_hosts)
        try:
            params = self._params(self._scratch, peers, stripes[1] if stripes else None)
            try:
                self._watch = self.engine.add_torrent(params, label=f"image {self.image.id}")
            except RuntimeError as exc:
                raise exception.TorrentFetchError(
                    image_id=self.image.id,
                    reason=f"libtorrent refused the torrent {self.magnet.best_hash} ({exc}); "
                    "this process may already seed it",
                ) from exc
            LOG.info(
                "Image %s: joining swarm %s (%d trackers, %d peer hints)",
                self.image.id,
                self.magnet.best_hash,
                len(params.trackers),
                len(params.peers),
            )
            try:
                self._download(start)
                self._flush()
                self.resume_data = self._save_resume_data()
                self._collect_peer_stats()
            finally:
                self.stats.seconds = time.monotonic() - start
                self._stop_read_behind()
                if self._stripes is not None:
                    self._stripes.stop()
                    self.stats.per_stripe_server = dict(self._stripes.client.bytes_by_url)
                    self.stats.stripes_zone = self._stripes.client.urls_zone or ""
                    self.stats.bytes_from_origin += self._stripes.bytes_fetched
                    self.stats.bytes_total += self._stripes.bytes_fetched
                    self.stats.bytes_from_stripes = self._stripes.bytes_fetched
                    zone = self.stats.stripes_zone
                    if self.opts.zone and zone and zone != self.opts.zone:
                        LOG.warning(
                            "Image %s: %d MiB of stripes crossed from zone %s into zone %s",
                            self.image.id,
                            self._stripes.bytes_fetched >> 20,
                            zone,
                            self.opts.zone,
                        )
                if self._fill is not None:
                    self._fill.stop()
                    self.stats.bytes_from_glance = self._fill.bytes_fetched
                    self.stats.bytes_total += self._fill.bytes_fetched
                if self._landing is not None:
                    self.stats.bytes_landed = self._landing.bytes_landed
                    self.stats.hash_failures += self._landing.rejected
                    self._landing.close()
        except BaseException:
            self.leave()
            if created:
                verify.discard(self.destination)
            raise
        return self.stats

    def leave(self, *, share: bool = False) -> None:
        """Leave the swarm (idempotent); with ``share``, first hand over what connected
        hosts still lack (up to SHARE_LIMIT).

        Once this returns libtorrent has let go of the destination.
        """
        try:
            if share and self._watch is not None:
                self._hand_over()
        finally:
            if self._watch is not None:
                self.engine.remove_torrent(self._watch)
                self._watch = None
            if self._excluded:
                self.engine.include_peers(self._excluded)
                self._excluded = []
            if self._scratch is not None:
                shutil.rmtree(self._scratch, ignore_errors=True)
                self._scratch = None

    def _hand_over(self) -> None:
        # Stay while a connected host still lacks pieces this one has, not only while it
        # lacks pieces no other connected host has: hosts that finish together each see
        # the others holding everything and would all leave at once (bench, 8 hosts with
        # fetch_to_file: two hosts waited 3 and 4.3 s more on the origin's re-issue path).
        handle = self._watch.handle
        started = time.monotonic()
        lacking = peers_lacking_ours(handle)
        if not lacking:
            return
        while lacking and time.monotonic() - started < SHARE_LIMIT:
            for alert in self._watch.drain(timeout=POLL_INTERVAL):
                try:
                    self._on_alert(alert)
                except exception.TorrentImagesError as exc:
                    # The download is complete and checked; only the hand-over is cut short.
                    LOG.warning("Image %s: leaving the swarm early: %s", self.image.id, exc)
                    return
            lacking = peers_lacking_ours(handle)
        LOG.info(
            "Image %s: stayed %.1fs in the swarm to hand over pieces to connected hosts "
            "that lacked them (%d still lacking)",
            self.image.id,
            time.monotonic() - started,
            lacking,
        )

    def _download(self, start: float) -> None:
        handle = self._watch.handle
        metadata_ok = False
        last_done, last_progress = -1, time.monotonic()
        next_log = start + self.opts.progress_interval
        while True:
            for alert in self._watch.drain(timeout=POLL_INTERVAL):
                self._on_alert(alert)
            status = utils.native_call(handle.status)
            now = time.monotonic()
            if not metadata_ok:
                if not status.has_metadata:
                    if now - start > self.opts.metadata_timeout:
                        raise exception.MetadataTimeout(
                            image_id=self.image.id,
                            timeout=self.opts.metadata_timeout,
                            peers=f"{status.num_peers} connected, {status.list_peers} known",
                        )
                    continue
                self._check_metadata()
                metadata_ok, last_progress = True, now
                # On at once: another round of the loop waited a poll interval first, 0.2 s
                # of a lone host's 1.6 s for 512 MiB.
                status = utils.native_call(handle.status)
            if self._pending_stripes is not None and status.state not in _CHECKING:
                # Not while libtorrent checks the files: add_piece then drops the pieces.
                self._start_stripes(self._pending_stripes, status)
                self._pending_stripes = None
            if (
                self.check is not None
                and self._read_behind is None
                and self.engine.writes_before_hashing
            ):
                self._start_read_behind()
            if (
                self._excluded
                and self._stripes is not None
                and (self._stripes.failed or self._stripes.origin_down)
            ):
                self._stripes_failed()
            if self._fill_reader is not None and self._fill is None:
                gone = self._origin_gone(now)
                if gone is not None:
                    self._start_fill(gone, everything=False)
            if self._fill is not None and self._stripes is not None:
                # An origin back from a restart hands out its stripes again: the fill
                # waits while it does (a stall still widens the fill to everything).
                self._fill.paused = not self._stripes.origin_down and not self._fill.everything
            if (
                not self._excluded
                and self._stripe_hosts
                and self._stripes is not None
                and self._stripes.running
                and not self._stripes.origin_down
            ):
                # Back from a restart: its BitTorrent port would only send duplicates again.
                self._excluded = self.engine.exclude_peers(self._stripe_hosts)
            # Where the bytes come from, from the peers' own counters at the poll's rate
            # (not an alert per 16 KiB block: engine.ALERT_MASK).
            self._watch.peer_bytes.update(utils.native_call(handle.get_peer_info))
            done = status.total_wanted_done
            if self._landing is not None:
                self._check_landing(status)
                done = self._done_bytes(status)
            if done > last_done:
                last_done, last_progress = done, now
            if self.progress is not None:
                self.progress(
                    done, status.total_wanted, status.download_payload_rate, status.num_peers
                )
            if status.is_finished and status.total_wanted_done >= status.total_wanted:
                self._finish_stats(status)
                return
            if self._landing is not None and done >= status.total_wanted:
                # Complete with pieces libtorrent never saw: it must fetch none of them.
                self._watch.handle.set_flags(lt.torrent_flags.upload_mode)
                self._finish_stats(status)
                LOG.info(
                    "Image %s: %d MiB of it landed by this host from the origin's stripes",
                    self.image.id,
                    self._landing.bytes_landed // units.Mi,
                )
                return
            percent = 100.0 * status.progress
            if now - last_progress > self.opts.stall_timeout:
                why = (
                    f"no progress for {self.opts.stall_timeout:g}s "
                    f"([torrent_images] stall_timeout) with {status.num_peers} peers"
                )
                if self._start_fill(why, everything=True):
                    last_progress = now
                    continue
                raise exception.TorrentStalled(
                    image_id=self.image.id,
                    timeout=self.opts.stall_timeout,
                    percent=percent,
                    peers=status.num_peers,
                )
            if now - start > self.opts.overall_timeout:
                raise exception.TorrentTimeout(
                    image_id=self.image.id, timeout=self.opts.overall_timeout, percent=percent
                )
            if now >= next_log:
                next_log = now + self.opts.progress_interval
                LOG.info(
                    "Image %s: %.1f%% of %d MiB, %.1f MiB/s, %d peers (%d seeds)",
                    self.image.id,
                    percent,
                    self.image.size // units.Mi,
                    status.download_payload_rate / units.Mi,
                    status.num_peers,
                    status.num_seeds,
                )

    def _check_landing(self, status: lt.torrent_status) -> None:
        """Stop landing once another host needs pieces; fail on a write error."""
        worker = self._stripes
        if worker is None:
            return
        if worker.storage_error is not None:
            raise exception.TorrentStorageError(
                image_id=self.image.id, path=self.destination, reason=str(worker.storage_error)
            )
        if self._landing.active and status.num_peers > status.num_seeds:
            worker.stop_landing("a host that lacks pieces connected")

    def _on_alert(self, alert: AlertEvent) -> None:
        if alert.is_a(lt.hash_failed_alert):
            self.stats.hash_failures += 1
            LOG.warning(
                "Image %s: piece %d failed its hash check and is downloaded again "
                "(a peer sent bad data)",
                self.image.id,
                alert.piece_index,
            )
        elif alert.is_a(lt.file_error_alert, lt.torrent_error_alert):
            raise exception.TorrentStorageError(
                image_id=self.image.id, path=self.destination, reason=alert.message
            )
        elif alert.is_a(lt.peer_ban_alert, lt.peer_blocked_alert):
            self.stats.peers_banned += 1
            LOG.warning("Image %s: %s", self.image.id, alert.message)
        elif alert.is_a(lt.tracker_error_alert):
            LOG.warning("Image %s: tracker: %s", self.image.id, alert.message)
        else:
            LOG.debug("Image %s: %s", self.image.id, alert.message)

    def _finish_stats(self, status: lt.torrent_status) -> None:
        # Blocks of pieces that failed their hash check are counted too; total_payload
        # is what really crossed the wire, and the split by peer adds up to it.
        self.stats.bytes_total = status.total_payload_download

    def _collect_peer_stats(self) -> None:
        # Pieces given with add_piece (the origin's stripes, Glance's fill) come through no
        # peer connection: they are counted as bytes_from_stripes/_glance already.
        handle = self._watch.handle
        peer_bytes = self._watch.peer_bytes
        peer_bytes.update(utils.native_call(handle.get_peer_info))  # the final counters
        # What the peers sent that libtorrent used: the payload less end-game duplicates
        # (64 MiB from two seeds: 192 KiB of them), yet not less than what libtorrent
        # holds beyond the pieces given to it with add_piece (the same download once had
        # 5364 bytes "redundant" with a payload of exactly 64 MiB: partial blocks of
        # closed connections count as waste).
        status = utils.native_call(handle.status)
        payload = status.total_payload_download
        given = self._fill.bytes_fetched if self._fill is not None else 0
        if self._stripes is not None:
            landed = self._landing.bytes_landed if self._landing is not None else 0
            given += self._stripes.bytes_fetched - landed
        used = max(payload - status.total_redundant_bytes, status.total_wanted_done - given)
        for (host, port), size in peer_bytes.totals(min(payload, used)).items():
            key = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            self.stats.per_peer[key] = self.stats.per_peer.get(key, 0) + size
            if host in self._origin_hosts:
                self.stats.bytes_from_origin += size
            else:
                self.stats.bytes_from_peers += size
        self.stats.peers_seen = len(self.stats.per_peer)

    def _flush(self) -> None:
        if not self._watch.flush(FLUSH_TIMEOUT, self._on_alert):
            raise exception.TorrentStorageError(
                image_id=self.image.id,
                path=self.destination,
                reason=f"the disk cache was not flushed within {FLUSH_TIMEOUT:.0f}s",
            )

    def _save_resume_data(self) -> bytes | None:
        self._watch.handle.save_resume_data(lt.save_resume_flags_t.save_info_dict)
        saved = self._watch.wait_for(lt.save_resume_data_alert, FLUSH_TIMEOUT, self._on_alert)
        if saved is None:
            # Only seeding needs it; the download itself is complete and verified.
            LOG.warning(
                "Image %s: libtorrent did not return the torrent metadata; this "
                "host will not seed the image",
                self.image.id,
            )
            return None
        return saved.resume_data
