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

"""The libtorrent session of a process, in the datacenter profile, and its alert pump.

One :class:`SwarmEngine` per process (``get_engine``); tests make several, one per
simulated host, each bound to its own 127.0.0.x address. A single pump thread owns
``pop_alerts`` and hands each torrent's alerts to the :class:`TorrentWatch` that added it,
so concurrent downloads never steal each other's alerts. The pump sleeps between polls
instead of blocking in C (``wait_for_alert``) and never uses ``set_alert_notify``, which
deadlocks on the GIL: under eventlet its thread is a green thread and the hub keeps running.
"""

from __future__ import annotations

import contextlib
import ipaddress
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import libtorrent as lt
from oslo_config import cfg
from oslo_log import log as logging
from oslo_utils import units

from nova_torrent_images import exception
from nova_torrent_images.common import qos, utils

LOG = logging.getLogger(__name__)

# Short sleeps between pops while alerts flow or somebody waits for one: every handoff
# (flush, resume data, removal) waits for the pump, so its latency adds up per download.
PUMP_INTERVAL = 0.01
# With nothing to pop and nobody waiting, the pump backs off to this. With no alert per
# block a download's alerts are a trickle (8 hosts x 128 MiB: about 30 alerts per host),
# and 100 idle pops a second were what was left of the pump's CPU: 0.15-0.31 CPU-s per
# GiB on a fleet of 8 hosts x 128 MiB sharing 2 cores; backing off, 0.00-0.08.
PUMP_IDLE_INTERVAL = 0.1
# libtorrent hands out rate-limit quota, and answers control messages of a rate-limited
# peer, once per tick (500 ms by default): a capped download then runs well below its cap
# (a lone 64 MiB download capped at 16 MiB/s: 11.6 MiB/s) and every hand-over between hosts
# waits for a tick. Measured on fleets of 64 MiB, caps 16 MiB/s (time over the 4 s floor):
# 4 hosts 1.60x at 500 ms, 1.14x at 100 ms; 8 hosts 1.54-1.64x at 500 ms, 1.27-1.35x at
# 100, 1.18x at 50, 1.10-1.14x at 25; the same CPU at every tick, and no change on a
# CPU-bound 16-host fleet.
TICK_INTERVAL_MS = 50
ALERT_MASK = (
    lt.alert_category.error
    | lt.alert_category.status
    | lt.alert_category.storage
    | lt.alert_category.tracker
    | lt.alert_category.ip_block
    | lt.alert_category.performance_warning
    | lt.alert_category.peer  # peer_ban_alert: which peer sent bad data
    # Not block_progress: two alerts per 16 KiB block (block_downloading, block_finished),
    # 131072 per GiB, each wrapped in a Python object by pop_alerts. Measured on a fleet of
    # 8 hosts x 128 MiB: the pump thread alone 0.46-0.57 CPU-s per GiB. Where the bytes came
    # from is read from the peers' own counters instead (PeerBytes), and progress and
    # stalls from torrent_status, polled by the transfer.
)
_DISK_IO = {
    "posix": "posix_disk_io_constructor",
    "mmap": "mmap_disk_io_constructor",
    "pread": "pread_disk_io_constructor",
    "default": None,
}


def _is_wildcard(host: str) -> bool:
    return host.strip("[]") in ("0.0.0.0", "::", "")


def build_ip_filter(cidrs: Iterable[str]) -> lt.ip_filter | None:
    """An ip_filter that blocks every peer address outside ``cidrs`` (None: allow all)."""
    networks = [ipaddress.ip_network(c.strip(), strict=False) for c in cidrs if c.strip()]
    if not networks:
        return None
    ipf = lt.ip_filter()
    ipf.add_rule("0.0.0.0", "255.255.255.255", 1)  # 1 = blocked
    ipf.add_rule("::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 1)
    for net in networks:
        ipf.add_rule(str(net[0]), str(net[-1]), 0)
    return ipf


def build_settings(opts: cfg.ConfigOpts.GroupAttr, listen: list[str] | None = None) -> dict:
    """libtorrent settings for a datacenter: no discovery beyond trackers and hints.

    ``listen`` replaces ``listen_interfaces`` (a simulated host's own 127.0.0.x).
    """
    listen = [i.strip() for i in (listen or opts.listen_interfaces) if i.strip()]
    settings = {
        "listen_interfaces": ",".join(listen),
        "max_retry_port_bind": opts.max_retry_port_bind,
        "enable_dht": False,
        "enable_lsd": False,
        "enable_upnp": False,
        "enable_natpmp": False,
        "webtorrent_stun_server": "",  # 2.1 would otherwise contact an outside STUN server
        # TCP only: uTP's delay-based congestion control is meant for home links and only
        # slows a datacenter fabric down; QoS for guests comes from the explicit rate limits.
        "enable_outgoing_utp": False,
        "enable_incoming_utp": False,
        "alert_mask": int(ALERT_MASK),
        "tick_interval": TICK_INTERVAL_MS,
        "alert_queue_size": 100000,
        "upload_rate_limit": opts.upload_rate_limit * units.Ki,
        "download_rate_limit": opts.download_rate_limit * units.Ki,
        "connections_limit": opts.connections_limit,
        # Every host of a fleet uploads to every peer that wants a piece: with libtorrent's
        # default of 8 unchoke slots, 16 hosts left some choked by everyone until an
        # optimistic unchoke (15-30 s); guests are protected by the rate limits instead.
        "unchoke_slots_limit": -1,
        "min_announce_interval": opts.min_announce_interval,
        "stop_tracker_timeout": 1,  # shutdown must not wait on a dead tracker
        # A host that seeded a hybrid torrent and later joins it again by a v1-only magnet
        # is refused by a peer that still counts the old connection from its address: the
        # join then times out. In a datacenter one address is one host, so allowing a
        # second connection per address costs nothing; duplicates are caught by peer id.
        "allow_multiple_connections_per_ip": True,
        # Keep "redundant" connections. A download joins in upload mode until its metadata
        # is checked, so for its first second a host is upload-only; by default libtorrent
        # then drops its connections to seeds and to other hosts in the same state, and
        # waits min_reconnect_time (60 s) before dialing them again (a super-seeding origin
        # then needs another 10 s to offer a piece). Measured with six hosts fetching
        # 128 MiB at once: 17-72 s with the default, a steady 15 s without. Sockets stay
        # bounded by connections_limit.
        "close_redundant_connections": False,
        "user_agent": "nova-torrent-images/libtorrent-" + lt.__version__,
        "peer_fingerprint": "-NT0001-",
        # Hosts announce often so that a new peer is found within seconds.
        "tracker_completion_timeout": 10,
        "tracker_receive_timeout": 10,
    }
    if len(listen) == 1:
        host = listen[0].rpartition(":")[0]
        if not _is_wildcard(host):
            # Connect out from the listen address, so peers see the same address that the
            # tracker announced (and simulated hosts on 127.0.0.x stay apart).
            settings["outgoing_interfaces"] = host.strip("[]")
    return settings


@dataclass(frozen=True, slots=True)
class AlertEvent:
    """A copy of what a libtorrent alert said.

    Alert objects are owned by the session and freed by the next ``pop_alerts()``: handing
    them to another thread crashes the process. The pump copies the fields we use.
    """

    kind: type  # the libtorrent alert class
    message: str
    handle: lt.torrent_handle | None = None
    piece_index: int = -1
    block_index: int = -1
    endpoint: tuple[str, int] | None = None
    resume_data: bytes | None = None  # save_resume_data_alert: bencoded resume data

    def is_a(self, *kinds: type) -> bool:
        return issubclass(self.kind, kinds)

    @property
    def category(self) -> str:
        """What the alert means to callers outside ``swarm/`` (one of :data:`CATEGORIES`)."""
        for kinds, name in _CATEGORY_OF:
            if issubclass(self.kind, kinds):
                return name
        return "other"


# Alert meanings for code that must not import libtorrent (the seeders, the origin).
_CATEGORY_OF = (
    ((lt.file_error_alert, lt.torrent_error_alert), "storage_error"),
    ((lt.hash_failed_alert,), "hash_failed"),
    ((lt.peer_ban_alert, lt.peer_blocked_alert), "peer_refused"),
    ((lt.url_seed_alert,), "web_seed_error"),
    ((lt.tracker_error_alert, lt.scrape_failed_alert), "tracker_error"),
    ((lt.tracker_reply_alert,), "tracker_reply"),
)
CATEGORIES = tuple(name for _, name in _CATEGORY_OF) + ("other",)


@dataclass(frozen=True)
class TorrentCounters:
    """A torrent's numbers at one moment, copied out of libtorrent's status."""

    uploaded: int  # payload bytes, all time (resume data carries it across restarts)
    downloaded: int
    uploaded_since_added: int  # payload bytes since this handle was added
    downloaded_since_added: int
    peers: int
    upload_rate: int  # payload B/s
    finished: bool  # every wanted piece is there (flush before trusting the disk)


def snapshot_alert(alert: object) -> AlertEvent:
    kind = type(alert)
    if kind is lt.save_resume_data_alert:
        # Resume data holds the info dict and merkle trees: a base copy can be seeded
        # later, and after a restart, without asking the swarm for metadata or rehashing.
        # (write_torrent_file_buf refuses hybrid torrents whose piece layers it did not
        # keep, so the resume format is the reliable one.)
        return AlertEvent(
            kind,
            alert.message(),
            alert.handle,
            resume_data=bytes(lt.write_resume_data_buf(alert.params)),
        )
    endpoint = getattr(alert, "endpoint", None)
    return AlertEvent(
        kind,
        alert.message(),
        getattr(alert, "handle", None),
        getattr(alert, "piece_index", -1),
        getattr(alert, "block_index", -1),
        tuple(endpoint) if endpoint is not None else None,
    )


Endpoint = tuple[str, int]


class PeerBytes:
    """Payload bytes received from each peer endpoint, from libtorrent's per-connection
    counters (``peer_info.total_download``) polled a few times a second.

    A connection's counter is gone once it closes, so the bytes it delivered after the
    last poll are unseen; and the counters include end-game duplicates. :meth:`totals`
    reconciles the polled figures with the torrent's own count of what the peers sent
    (the transfer's ``_collect_peer_stats``): bytes unseen go to the connections that
    closed, by the share each delivered in its last poll interval; a surplus is taken
    from every peer in proportion. Blocks of pieces that failed their hash check stay
    counted: the peer did send them.
    """

    def __init__(self) -> None:
        self._live: dict[Endpoint, int] = {}  # open connections' counters at the last poll
        self._step: dict[Endpoint, int] = {}  # what each delivered in the last interval
        self._closed: dict[Endpoint, int] = {}  # bytes of connections that ended
        self._tail_weight: dict[Endpoint, int] = {}  # closed ones' share of unseen bytes

    def update(self, peers: Iterable[lt.peer_info]) -> None:
        """Fold one ``get_peer_info()`` answer in."""
        seen: dict[Endpoint, int] = {}
        for peer in peers:
            endpoint = (peer.ip[0], peer.ip[1])
            seen[endpoint] = seen.get(endpoint, 0) + peer.total_download
        for endpoint, count in seen.items():
            before = self._live.get(endpoint, 0)
            if count < before:  # a new connection from the same endpoint
                self._close(endpoint, before)
                before = 0
            self._step[endpoint] = count - before
        for endpoint in self._live.keys() - seen.keys():
            self._close(endpoint, self._live[endpoint])
        self._live = seen

    def _close(self, endpoint: Endpoint, count: int) -> None:
        self._closed[endpoint] = self._closed.get(endpoint, 0) + count
        step = self._step.pop(endpoint, 0)
        self._tail_weight[endpoint] = self._tail_weight.get(endpoint, 0) + step

    def totals(self, received: int) -> dict[Endpoint, int]:
        """Bytes per endpoint that sent any, summing to ``received`` when any peer did."""
        counts = dict(self._closed)
        for endpoint, count in self._live.items():
            counts[endpoint] = counts.get(endpoint, 0) + count
        counts = {endpoint: n for endpoint, n in counts.items() if n > 0}
        polled = sum(counts.values())
        if not polled:
            return counts
        unseen = received - polled
        if unseen > 0:
            weights = {e: w for e, w in self._tail_weight.items() if w > 0} or (
                {e: 1 for e in self._closed} or counts
            )
            counts = _spread(counts, weights, unseen)
        elif unseen < 0:  # end-game duplicates in the counters: scale everyone down
            counts = _spread({}, counts, received)
        return {endpoint: n for endpoint, n in counts.items() if n > 0}


def _spread(base: dict[Endpoint, int], weights: dict[Endpoint, int], amount: int) -> dict:
    """``base`` plus ``amount`` split by ``weights`` (exactly: rounding goes to the heaviest)."""
    out = dict(base)
    total = sum(weights.values())
    given = 0
    for endpoint, weight in weights.items():
        share = amount * weight // total
        out[endpoint] = out.get(endpoint, 0) + share
        given += share
    heaviest = max(weights, key=lambda e: weights[e])
    out[heaviest] = out.get(heaviest, 0) + amount - given
    return out


class TorrentWatch:
    """A torrent added through the engine, with the queue its alerts arrive on."""

    def __init__(
        self,
        handle: lt.torrent_handle,
        label: str,
        awaiting: Callable[[], contextlib.AbstractContextManager] | None = None,
    ) -> None:
        self.handle = handle
        self.label = label
        self.alerts: queue.Queue = queue.Queue()
        # While a caller waits for one alert, the engine's pump polls at full rate.
        self._awaiting = awaiting or contextlib.nullcontext
        # Payload bytes per peer endpoint; the transfer polls the peers into it.
        self.peer_bytes = PeerBytes()

    def counters(self) -> TorrentCounters:
        st = self.handle.status()
        return TorrentCounters(
            uploaded=st.all_time_upload,
            downloaded=st.all_time_download,
            uploaded_since_added=st.total_payload_upload,
            downloaded_since_added=st.total_payload_download,
            peers=st.num_peers,
            upload_rate=st.upload_payload_rate,
            finished=st.is_finished and st.total_wanted_done >= st.total_wanted,
        )

    def set_super_seeding(self, enabled: bool) -> None:
        """Initial seeding: offer each peer pieces nobody has yet (an origin's egress)."""
        if enabled:
            self.handle.set_flags(lt.torrent_flags.super_seeding)
        else:
            self.handle.unset_flags(lt.torrent_flags.super_seeding)

    def flush(self, timeout: float, on_other=None) -> bool:
        """Write libtorrent's cache to disk; False when it did not confirm in time.

        libtorrent 2.1 may report "finished" before every block is written, so every
        reader of a finished download flushes first.
        """
        self.handle.flush_cache()
        return self.wait_for(lt.cache_flushed_alert, timeout, on_other) is not None

    def drain(self, timeout: float = 0.0) -> list[AlertEvent]:
        """Alerts received so far, waiting up to ``timeout`` for the first one."""
        items = []
        try:
            items.append(self.alerts.get(timeout=timeout) if timeout else self.alerts.get_nowait())
            while True:
                items.append(self.alerts.get_nowait())
        except queue.Empty:
            pass
        return items

    def wait_for(self, alert_type: type, timeout: float, on_other=None) -> AlertEvent | None:
        """Wait for an alert of ``alert_type``; others go to ``on_other`` (or are dropped)."""
        deadline = time.monotonic() + timeout
        with self._awaiting():
            while (left := deadline - time.monotonic()) > 0:
                try:
                    alert = self.alerts.get(timeout=min(left, 0.2))
                except queue.Empty:
                    continue
                if alert.is_a(alert_type):
                    return alert
                if on_other is not None:
                    on_other(alert)
        return None


class SwarmEngine:
    """Owns one libtorrent session configured from ``[torrent_images]``."""

    def __init__(self, conf: cfg.ConfigOpts, *, listen_interfaces: list[str] | None = None) -> None:
        self.conf = conf
        self.opts = conf.torrent_images
        self._listen_override = listen_interfaces
        self._session: lt.session | None = None
        self._watches: dict[lt.torrent_handle, TorrentWatch] = {}
        self._lock = threading.Lock()
        self._pump: threading.Thread | None = None
        self._stopping = threading.Event()
        self._wake = threading.Event()  # the pump's sleep, cut short
        self._waiters = 0  # callers waiting for an alert (TorrentWatch.wait_for)
        self._excluded: dict[str, int] = {}  # address -> transfers that exclude it
        # download_rate_limit for the bytes that reach the host outside libtorrent's
        # limiter: the origin's stripes (swarm/stripes.py), shared by all transfers.
        self.stripe_downlink = utils.RateLimiter(self.opts.download_rate_limit * units.Ki)

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> SwarmEngine:
        with self._lock:
            if self._session is not None:
                return self
            settings = build_settings(self.opts, self._listen_override)
            params = lt.session_params()
            params.settings = settings
            disk_io = _DISK_IO[self.opts.disk_io]
            if disk_io:
                params.disk_io_constructor = disk_io
            try:
                cidrs = list(self.opts.allowed_peer_cidrs)
                ip_filter = build_ip_filter(cidrs)
            except ValueError as exc:
                raise exception.ConfigError(option="allowed_peer_cidrs", reason=str(exc)) from exc
            if ip_filter is not None:
                params.ip_filter = ip_filter
            # libtorrent's threads (network, disk, hashing: the downloading, piece
            # hashing and seeding) inherit the priority of the thread that creates the
            # session: a lowered one, so guests come first (nova_torrent_images.common.qos).
            qos.configure(self.conf)
            session = qos.call_in_background(lambda: lt.session(params))
            # Rate limits skip "local" peers (private ranges, loopback) unless every address
            # is in the global peer class; in a datacenter every peer is local.
            classes = lt.ip_filter()
            everyone = 1 << lt.session.global_peer_class_id
            classes.add_rule("0.0.0.0", "255.255.255.255", everyone)
            classes.add_rule("::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", everyone)
            session.set_peer_class_filter(classes)
            self._session = session
            self._stopping.clear()
            self._pump = threading.Thread(
                target=self._pump_alerts, name="torrent-alert-pump", daemon=True
            )
            self._pump.start()
        LOG.info(
            "Swarm engine started: listening on %s, peers allowed from %s, disk I/O %s, "
            "upload limit %s KiB/s, download limit %s KiB/s",
            settings["listen_interfaces"],
            ", ".join(cidrs) or "anywhere",
            self.opts.disk_io,
            self.opts.upload_rate_limit or "no",
            self.opts.download_rate_limit or "no",
        )
        return self

    def shutdown(self) -> None:
        """Stop the pump and destroy the session (tracker stops wait at most 1 s)."""
        with self._lock:
            session, self._session = self._session, None
            self._stopping.set()
            self._wake.set()
            pump, self._pump = self._pump, None
            self._watches.clear()
        if pump is not None:
            pump.join(timeout=5)
        if session is not None:
            session.pause()
            del session

    @property
    def session(self) -> lt.session:
        if self._session is None:
            raise exception.TorrentImagesError("The swarm engine is not started")
        return self._session

    @property
    def writes_before_hashing(self) -> bool:
        """Whether a piece libtorrent reports as had is in the destination already.

        The posix backend writes each block with ``pwrite`` on the network thread before it
        hashes the piece back from the file. The others hash from their write buffer and
        write later: a reader of the destination must flush first (a read-behind hash that
        did not read zeros from holes, or ENOENT before the file existed).
        """
        return self.opts.disk_io == "posix"

    @property
    def listen_port(self) -> int:
        return self.session.listen_port()

    def listen_host(self) -> str:
        listen = self._listen_override or list(self.opts.listen_interfaces)
        return listen[0].rpartition(":")[0].strip("[]")

    def set_rate_limits(
        self, upload_kib: int | None = None, download_kib: int | None = None
    ) -> None:
        pack = {}
        if upload_kib is not None:
            pack["upload_rate_limit"] = upload_kib * units.Ki
        if download_kib is not None:
            pack["download_rate_limit"] = download_kib * units.Ki
            self.stripe_downlink.rate = download_kib * units.Ki
        self.session.apply_settings(pack)

    # -- peers -------------------------------------------------------------------------
    def exclude_peers(self, addresses: Iterable[str]) -> list[str]:
        """Keep the session off ``addresses`` (an origin serving stripes) until included.

        Counted per address: concurrent transfers of images from the same origin each
        exclude and include it. Returns what to give :meth:`include_peers`.
        """
        added = [a for a in dict.fromkeys(addresses) if a]
        with self._lock:
            for address in added:
                self._excluded[address] = self._excluded.get(address, 0) + 1
            self._apply_ip_filter()
        return added

    def include_peers(self, addresses: list[str]) -> None:
        with self._lock:
            for address in addresses:
                left = self._excluded.get(address, 0) - 1
                if left > 0:
                    self._excluded[address] = left
                else:
                    self._excluded.pop(address, None)
            self._apply_ip_filter()

    def allows_peer(self, address: str) -> bool:
        """Whether the session would talk to ``address`` (allowed_peer_cidrs, exclusions)."""
        if address in self._excluded:
            return False
        cidrs = [c for c in self.opts.allowed_peer_cidrs if c.strip()]
        if not cidrs:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in ipaddress.ip_network(c.strip(), strict=False) for c in cidrs)

    def _apply_ip_filter(self) -> None:
        if self._session is None:
            return
        ip_filter = build_ip_filter(self.opts.allowed_peer_cidrs) or lt.ip_filter()
        for address in self._excluded:
            ip_filter.add_rule(address, address, 1)  # 1 = blocked
        self._session.set_ip_filter(ip_filter)

    # -- torrents ----------------------------------------------------------------------
    def add_torrent(self, params: lt.add_torrent_params, label: str) -> TorrentWatch:
        """Add a torrent and start routing its alerts to the returned watch."""
        with self._lock:
            handle = self.session.add_torrent(params)
            watch = TorrentWatch(handle, label, self._awaited)
            self._watches[handle] = watch
        return watch

    def remove_torrent(self, watch: TorrentWatch, *, timeout: float = 10.0) -> None:
        """Remove a torrent and wait until libtorrent let go of its storage.

        With the posix disk backend writes happen on libtorrent's network thread, so once
        ``torrent_removed_alert`` arrives no late write can touch the destination again.
        """
        if self._session is None:
            return
        self._session.remove_torrent(watch.handle)
        if watch.wait_for(lt.torrent_removed_alert, timeout) is None:
            LOG.warning("libtorrent did not confirm removal of %s within %ss", watch.label, timeout)
        with self._lock:
            self._watches.pop(watch.handle, None)

    # -- alert pump --------------------------------------------------------------------
    @contextlib.contextmanager
    def _awaited(self) -> Iterator[None]:
        """While inside, the pump polls every PUMP_INTERVAL (it is woken at once)."""
        with self._lock:
            self._waiters += 1
        self._wake.set()
        try:
            yield
        finally:
            with self._lock:
                self._waiters -= 1

    def _pump_alerts(self) -> None:
        qos.lower_thread_priority()
        interval = PUMP_INTERVAL
        while not self._stopping.is_set():
            session = self._session
            if session is None:
                break
            try:
                alerts = session.pop_alerts()
            except RuntimeError:
                LOG.exception("Popping libtorrent alerts failed")
                alerts = []
            for alert in alerts:
                try:
                    self._dispatch(alert)
                except Exception:  # noqa: BLE001  the pump must outlive any one alert
                    LOG.exception("Handling libtorrent alert %s failed", type(alert).__name__)
            if alerts or self._waiters:
                interval = PUMP_INTERVAL
            else:
                interval = min(interval * 2, PUMP_IDLE_INTERVAL)
            self._wake.wait(interval)
            self._wake.clear()

    def _dispatch(self, alert: object) -> None:
        # Runs before the next pop_alerts(), while ``alert`` is still valid.
        kind = type(alert)
        if kind in _NOISE:
            return
        handle = getattr(alert, "handle", None)
        if handle is not None:
            with self._lock:
                watch = self._watches.get(handle)
            if watch is not None:
                watch.alerts.put(snapshot_alert(alert))
                return
        category = alert.category()
        if isinstance(alert, lt.listen_failed_alert):
            LOG.error(
                "libtorrent cannot listen: %s (check [torrent_images] listen_interfaces)",
                alert.message(),
            )
        elif isinstance(alert, lt.listen_succeeded_alert):
            LOG.debug("libtorrent: %s", alert.message())
        elif category & lt.alert_category.error:
            LOG.warning("libtorrent: %s", alert.message())
        elif LOG.isEnabledFor(logging.DEBUG):  # message() formats a string: skip if unused
            LOG.debug("libtorrent: %s", alert.message())


# Alerts of the peer category nobody reads (and of connect, which the bench's debug mode
# turns on): dropped before any Python work is spent on them.
_NOISE = frozenset(
    {
        lt.block_timeout_alert,
        lt.unwanted_block_alert,
        lt.peer_connect_alert,
        lt.peer_disconnected_alert,
        lt.incoming_connection_alert,
    }
)

_ENGINE: SwarmEngine | None = None
_ENGINE_LOCK = threading.Lock()


def get_engine(conf: cfg.ConfigOpts) -> SwarmEngine:
    """The process's one engine, started on first use."""
    global _ENGINE
    with _ENGINE_LOCK:
        if _ENGINE is None:
            _ENGINE = SwarmEngine(conf).start()
        return _ENGINE


def shutdown_engine() -> None:
    global _ENGINE
    with _ENGINE_LOCK:
        engine, _ENGINE = _ENGINE, None
    if engine is not None:
        engine.shutdown()
