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

"""The origin seeder: the first seed of every published image, on a Glance API node.

``nova-torrent-images seed`` runs one :class:`OriginSeeder`: a libtorrent session
(:class:`~nova_torrent_images.swarm.engine.SwarmEngine`) that seeds every entry of the
publish registry and follows the registry as ``publish``/``unpublish`` change it (a cheap
stat every second, so a freshly published image is served before hosts can ask for it).

Why it behaves as it does:

* **Throttled** (``origin_upload_rate_limit``, applied to loopback and private peers too):
  an origin that uploads as fast as hosts ask sends most hosts their own copy; a capped
  one makes hosts fetch most pieces from each other.
* **Initial seeding** (``origin_super_seeding``, libtorrent super-seeding): each peer is
  offered pieces nobody has yet, so a piece leaves the origin about once. Measured with six
  hosts fetching 128 MiB: 1.0x the image from the origin with it, 2.2-2.4x without. libtorrent
  2.x cannot reveal the first piece while a connection is still in its handshake (every
  magnet peer's case), and only its 10-second timer reveals one later: a swarm starts
  about ten seconds late. ``origin_super_seeding = false`` trades egress for that delay;
  the default ``auto`` turns it off on a node that serves stripes, whose BitTorrent port
  only other clients use (this project's hosts fetch the stripes), so a lone standard
  client is served at once instead of ten seconds late and a piece at a time.
* **Seed mode**: published data was verified against Glance when it was written, so it is
  not rehashed at start-up; libtorrent checks each piece the first time it is served.
* **Web seed only here** (``origin_web_seed``): when an entry's data is missing the seeder
  downloads it again, from Glance's ``/v2/images/<id>/file`` as a web seed plus any peers,
  verifies it against the sidecar's Glance hash, and seeds it. Compute hosts never get
  that URL (it is not in the magnet; libtorrent keeps url-seeds outside the info dict).
* **Periodic check** (``origin_check_interval``): images deleted, deactivated or replaced
  in Glance are unpublished (see :meth:`Publisher.check`).
* **Stops cleanly**: :meth:`stop` (SIGTERM in the command) removes the torrents, tells the
  trackers (at most one second) and destroys the session.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from oslo_config import cfg
from oslo_log import log as logging
from oslo_utils import units

from nova_torrent_images import exception
from nova_torrent_images.glance import verify
from nova_torrent_images.glance.client import GlanceClient
from nova_torrent_images.origin.dispenser import StripeDispenser
from nova_torrent_images.origin.metrics import OriginMetrics
from nova_torrent_images.origin.publisher import Publisher
from nova_torrent_images.origin.registry import PublishedImage, Registry
from nova_torrent_images.origin.stripe_guard import ConnectionLimits
from nova_torrent_images.origin.stripe_server import StripeServer
from nova_torrent_images.swarm import recipes, torrent
from nova_torrent_images.swarm.engine import AlertEvent, SwarmEngine, TorrentWatch

LOG = logging.getLogger(__name__)

TICK = 0.2
REGISTRY_POLL = 1.0
RETRY_AFTER = 60.0
FLUSH_TIMEOUT = 60.0


@dataclass
class SeededImage:
    """An image the seeder serves (or re-downloads through the web seed)."""

    entry: PublishedImage
    watch: TorrentWatch
    mode: str  # "seed" or "web-seed download"
    added: float
    partial_path: str | None = None
    uploaded_earlier: int = 0  # bytes uploaded by earlier handles of the same image
    errors: set[str] = field(default_factory=set)


@dataclass
class ImageStats:
    image_id: str
    mode: str
    peers: int
    upload_rate: int
    uploaded: int
    downloaded: int
    size: int


class OriginSeeder:
    """Seeds every published image of a registry until stopped."""

    def __init__(
        self,
        conf: cfg.ConfigOpts,
        *,
        glance: GlanceClient | None = None,
        publisher: Publisher | None = None,
        registry: Registry | None = None,
        listen_interfaces: list[str] | None = None,
    ) -> None:
        self.conf = conf
        self.opts = conf.torrent_images
        if publisher is None and glance is not None:
            publisher = Publisher(conf, glance, registry=registry)
        self.publisher = publisher
        self.registry = (
            publisher.registry
            if publisher is not None
            else registry or Registry(self.opts.origin_state_dir, self.opts.origin_data_dir)
        )
        self.engine = SwarmEngine(conf, listen_interfaces=listen_interfaces)
        self._seeds: dict[str, SeededImage] = {}
        self._retry_at: dict[str, float] = {}
        self._uploaded_gone = 0  # bytes uploaded for images no longer seeded
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._signature: tuple | None = None
        self._listener: Any = None  # promotion.NotificationListener, when listening
        self._started_at = time.monotonic()
        # Read from stats() and uploaded_bytes() at each scrape of origin_metrics_listen.
        self.metrics = OriginMetrics(self)
        self.stripes: StripeServer | None = None
        self._stripes_served_before_stop = 0

    # -- lifecycle ---------------------------------------------------------------------
    @property
    def super_seeding(self) -> bool:
        """Whether published images are super-seeded (``origin_super_seeding``)."""
        value = str(self.opts.origin_super_seeding).lower()
        if value == "auto":
            return not self.opts.origin_stripe_listen
        return value == "true"

    def start(self) -> OriginSeeder:
        """Start the session and seed what the registry holds; does not block."""
        self.registry.ensure()
        if self.opts.origin_metrics_listen:
            self.metrics.serve(self.opts.origin_metrics_listen)  # a bad value fails here
        self.engine.start()
        # The engine's own limit is the compute-side upload_rate_limit; the origin has its own.
        self.engine.set_rate_limits(upload_kib=self.opts.origin_upload_rate_limit)
        if self.opts.origin_stripe_listen and self.stripes is None:
            self.stripes = StripeServer(
                self.opts.origin_stripe_listen,
                StripeDispenser(
                    self.registry,
                    batch_bytes=self.opts.origin_stripe_batch * 1024,
                    reissue_after=self.opts.origin_stripe_reissue_after,
                    held_bytes=self.opts.origin_stripe_held_per_address * 1024 * 1024,
                    zone=(self.opts.origin_zone or "").strip() or None,
                ),
                rate_limit=(
                    self.opts.origin_stripe_rate_limit or self.opts.origin_upload_rate_limit
                )
                * 1024,
                allowed_cidrs=list(self.opts.allowed_peer_cidrs),
                limits=ConnectionLimits(
                    per_address=self.opts.origin_stripe_connections_per_address,
                    total=self.opts.origin_stripe_max_connections,
                    request_timeout=self.opts.origin_stripe_request_timeout,
                    send_timeout=self.opts.origin_stripe_send_timeout,
                ),
                zone=(self.opts.origin_zone or "").strip() or None,
                image_status=self.image_status,
            ).start()
        self._started_at = time.monotonic()
        self._stop.clear()
        self.sync()
        promote = self.opts.promotion_enabled and self.opts.promotion_source == "notifications"
        if promote or self.opts.origin_publish_on_activate:
            # One listener for both: popularity (image.send) and activation (image.activate,
            # image.delete).
            from nova_torrent_images.origin import promotion

            self._listener = promotion.start_notification_listener(self.conf, self.publisher)
        LOG.info(
            "Origin seeder listening on %s:%d: %d published images, upload limit %s, "
            "super-seeding %s, web seed %s, Glance check %s",
            self.engine.listen_host(),
            self.engine.listen_port,
            len(self._seeds),
            f"{self.opts.origin_upload_rate_limit} KiB/s"
            if self.opts.origin_upload_rate_limit
            else "none",
            "on" if self.super_seeding else "off",
            "on" if self.opts.origin_web_seed else "off",
            f"every {self.opts.origin_check_interval}s"
            if self.opts.origin_check_interval
            else "off",
        )
        return self

    def start_in_thread(self) -> OriginSeeder:
        """Start, then run the loop in a daemon thread (tests, the demo)."""
        self.start()
        self._thread = threading.Thread(target=self.run, name="origin-seeder", daemon=True)
        self._thread.start()
        return self

    def run(self) -> None:
        """The seeder's loop: follow the registry, drain alerts, check Glance, log stats.

        Returns when :meth:`stop` is called (from a signal handler or another thread).
        """
        now = time.monotonic()
        next_poll = now + REGISTRY_POLL
        next_check = (
            now + self.opts.origin_check_interval if self.opts.origin_check_interval else None
        )
        next_stats = (
            now + self.opts.origin_stats_interval if self.opts.origin_stats_interval else None
        )
        while not self._stop.wait(TICK):
            try:
                self._drain_alerts()
                now = time.monotonic()
                if now >= next_poll:
                    next_poll = now + REGISTRY_POLL
                    if self.registry.signature() != self._signature or self._due_retries(now):
                        self.sync()
                if next_check is not None and now >= next_check:
                    next_check = now + self.opts.origin_check_interval
                    self.check()
                if next_stats is not None and now >= next_stats:
                    next_stats = now + self.opts.origin_stats_interval
                    self.log_stats()
            except Exception:  # noqa: BLE001  the seeder must outlive one bad image
                LOG.exception("Origin seeder loop error; continuing")

    def request_stop(self) -> None:
        """Make :meth:`run` return at its next tick; safe in a signal handler."""
        self._stop.set()

    def stop(self) -> None:
        """Stop seeding: the loop, the notification listener, then the session."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
            self._thread = None
        if self._listener is not None:
            try:
                self._listener.stop()
                self._listener.wait()
            except Exception:  # noqa: BLE001
                LOG.exception("Stopping the notification listener failed")
            self._listener = None
        self.metrics.stop()  # before the session goes: a scrape reads it
        if self.stripes is not None:
            self._stripes_served_before_stop = self.stripes.bytes_served
            self.stripes.stop()
            self.stripes = None
        with self._lock:
            uploaded = self.uploaded_bytes()
            self._seeds.clear()
        self.engine.shutdown()
        LOG.info(
            "Origin seeder stopped after %.0fs, %d MiB uploaded",
            time.monotonic() - self._started_at,
            uploaded // units.Mi,
        )

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def endpoint(self) -> tuple[str, int]:
        return self.engine.listen_host(), self.engine.listen_port

    # -- registry ----------------------------------------------------------------------
    def sync(self) -> None:
        """Seed exactly the registry's entries: add new ones, drop removed or changed ones."""
        with self._lock:
            self._signature = self.registry.signature()
            entries = {e.image_id: e for e in self.registry.list()}
            for image_id in list(self._seeds):
                seeded = self._seeds[image_id]
                entry = entries.get(image_id)
                if entry is None or (entry.info_hash_v1, entry.info_hash_v2) != (
                    seeded.entry.info_hash_v1,
                    seeded.entry.info_hash_v2,
                ):
                    self._remove(image_id, "unpublished" if entry is None else "republished")
            for image_id in set(self._retry_at) - set(entries):
                del self._retry_at[image_id]
            now = time.monotonic()
            for image_id, entry in entries.items():
                if image_id in self._seeds:
                    self._seeds[image_id].entry = entry
                    continue
                if self._retry_at.get(image_id, 0) > now:
                    continue
                try:
                    self._add(entry)
                    self._retry_at.pop(image_id, None)
                except Exception as exc:  # noqa: BLE001  one broken entry must not stop the rest
                    self._retry_at[image_id] = now + RETRY_AFTER
                    LOG.error(
                        "Image %s: cannot seed it (retrying in %.0fs): %s",
                        image_id,
                        RETRY_AFTER,
                        exc,
                    )

    def _due_retries(self, now: float) -> bool:
        return any(t <= now for t in self._retry_at.values())

    def check(self) -> None:
        """Unpublish what Glance no longer backs, then follow the registry."""
        if self.publisher is None:
            LOG.warning("Origin seeder has no Glance client; skipping the periodic check")
            return
        results = self.publisher.check()
        if results:
            LOG.info(
                "Periodic check unpublished %d images: %s",
                len(results),
                ", ".join(f"{r.image_id} ({r.reason})" for r in results),
            )
        self.sync()

    def _web_seed_url(self, image_id: str) -> str | None:
        if not self.opts.origin_web_seed:
            return None
        endpoint = self.opts.glance_endpoint
        if not endpoint:
            LOG.error(
                "[torrent_images] origin_web_seed needs glance_endpoint; no web seed for %s",
                image_id,
            )
            return None
        return f"{endpoint.rstrip('/')}/v2/images/{image_id}/file"

    def _add(self, entry: PublishedImage) -> None:
        torrent_data = self.registry.read_torrent(entry)
        try:
            meta = torrent.describe(torrent_data)
        except ValueError as exc:
            raise exception.RegistryError(path=entry.torrent_path, reason=str(exc)) from exc
        if meta.total_size != entry.size or meta.num_files != 1:
            raise exception.RegistryError(
                path=entry.torrent_path,
                reason=f"the torrent does not describe image {entry.image_id} "
                f"({meta.num_files} files, {meta.total_size} bytes)",
            )
        trackers = self.publisher.trackers() if self.publisher else []
        partial = None
        if entry.has_data():
            params = recipes.origin_params(torrent_data, path=entry.data_path, trackers=trackers)
            mode = "seed"
        else:
            url = self._web_seed_url(entry.image_id)
            if url is None:
                raise exception.RegistryError(
                    path=entry.data_path,
                    reason=f"the data of image {entry.image_id} is missing; publish the image "
                    "again, or enable [torrent_images] origin_web_seed to fetch it from Glance",
                )
            partial = entry.data_path + ".partial"
            params = recipes.origin_params(
                torrent_data, path=partial, trackers=trackers, web_seed=url
            )
            mode = "web-seed download"
            LOG.warning(
                "Image %s: data missing, downloading it again from the web seed %s",
                entry.image_id,
                url,
            )
        watch = self.engine.add_torrent(params, label=f"origin seed {entry.image_id}")
        if mode == "seed" and self.super_seeding:
            watch.set_super_seeding(True)
        self._seeds[entry.image_id] = SeededImage(
            entry, watch, mode, time.monotonic(), partial_path=partial
        )
        LOG.info(
            "Image %s: %s (%d MiB, v2 %s)",
            entry.image_id,
            "seeding" if mode == "seed" else "re-downloading",
            entry.size // units.Mi,
            entry.info_hash_v2,
        )

    def _remove(self, image_id: str, reason: str) -> None:
        seeded = self._seeds.pop(image_id)
        self._uploaded_gone += self._uploaded(seeded)
        self.engine.remove_torrent(seeded.watch)
        if seeded.partial_path:
            verify.discard(seeded.partial_path)
        LOG.info("Image %s: no longer seeded (%s)", image_id, reason)

    # -- alerts ------------------------------------------------------------------------
    def _drain_alerts(self) -> None:
        with self._lock:
            for image_id, seeded in list(self._seeds.items()):
                for alert in seeded.watch.drain():
                    self._on_alert(seeded, alert)
                if seeded.mode == "web-seed download" and image_id in self._seeds:
                    self._maybe_finish_download(seeded)

    def _on_alert(self, seeded: SeededImage, alert: AlertEvent) -> None:
        image_id = seeded.entry.image_id
        category = alert.category
        if category == "storage_error":
            if self._seeds.get(image_id) is not seeded:
                return  # already removed for an earlier alert of the same batch
            LOG.error(
                "Image %s: libtorrent storage error, stop seeding it (retrying in %.0fs): %s",
                image_id,
                RETRY_AFTER,
                alert.message,
            )
            self._retry_at[image_id] = time.monotonic() + RETRY_AFTER
            self._remove(image_id, "storage error")
        elif category == "hash_failed":
            LOG.error(
                "Image %s: piece %d of the published data fails its hash check (data on "
                "disk damaged?); it is fetched again from peers",
                image_id,
                alert.piece_index,
            )
        elif category in ("tracker_error", "web_seed_error"):
            # One line per distinct problem: a tracker that is down fails every announce.
            if alert.message not in seeded.errors:
                seeded.errors.add(alert.message)
                LOG.warning("Image %s: %s", image_id, alert.message)
        elif category == "tracker_reply":
            seeded.errors.clear()
            LOG.debug("Image %s: %s", image_id, alert.message)
        else:
            LOG.debug("Image %s: %s", image_id, alert.message)

    def _maybe_finish_download(self, seeded: SeededImage) -> None:
        counters = seeded.watch.counters()
        if not counters.finished:
            return
        image_id = seeded.entry.image_id
        # libtorrent may call a download finished before every block is on disk.
        if not seeded.watch.flush(FLUSH_TIMEOUT):
            LOG.warning("Image %s: libtorrent did not confirm the flush; checking anyway", image_id)
        partial = seeded.partial_path
        seeded.partial_path = None  # _remove must not discard it
        self._remove(image_id, "download finished")
        try:
            verify.verify_file(seeded.entry.image_info(), partial)
        except (exception.IntegrityError, OSError) as exc:
            LOG.error("Image %s: re-downloaded data does not match Glance: %s", image_id, exc)
            verify.discard(partial)
            self._retry_at[image_id] = time.monotonic() + RETRY_AFTER
            return
        os.replace(partial, seeded.entry.data_path)
        LOG.info(
            "Image %s: %d MiB re-downloaded (%d MiB through the Glance web seed) and verified",
            image_id,
            seeded.entry.size // units.Mi,
            counters.downloaded_since_added // units.Mi,
        )
        try:
            self._add(seeded.entry)
        except Exception as exc:  # noqa: BLE001  retried like any entry that fails to load
            self._retry_at[image_id] = time.monotonic() + RETRY_AFTER
            LOG.error(
                "Image %s: cannot seed it (retrying in %.0fs): %s", image_id, RETRY_AFTER, exc
            )

    # -- statistics --------------------------------------------------------------------
    @staticmethod
    def _uploaded(seeded: SeededImage) -> int:
        try:
            return seeded.uploaded_earlier + seeded.watch.counters().uploaded_since_added
        except RuntimeError:  # libtorrent's "invalid torrent handle": removed meanwhile
            return seeded.uploaded_earlier

    def uploaded_bytes(self, image_id: str | None = None) -> int:
        """Payload bytes uploaded since start (one image, or all, removed ones included).

        Stripes served over HTTP count too: both are the origin's egress.
        """
        with self._lock:
            if image_id is not None:
                seeded = self._seeds.get(image_id)
                return self._uploaded(seeded) if seeded else 0
            stripes = self.stripes.bytes_served if self.stripes is not None else 0
            return (
                self._uploaded_gone
                + sum(self._uploaded(s) for s in self._seeds.values())
                + stripes
                + self._stripes_served_before_stop
            )

    def image_status(self, entry: PublishedImage) -> dict[str, object]:
        """What the seeder adds to the stripe server's ``GET .../status`` of ``entry``:
        how it serves it, and how complete a re-download is (whole data counts 1.0 there)."""
        with self._lock:
            seeded = self._seeds.get(entry.image_id)
            if seeded is None:
                return {"mode": "not seeded"}
            try:
                counters = seeded.watch.counters()
            except RuntimeError:  # libtorrent's "invalid torrent handle": removed meanwhile
                return {"mode": seeded.mode}
            answer: dict[str, object] = {
                "mode": seeded.mode,
                "peers": counters.peers,
                "uploaded": seeded.uploaded_earlier + counters.uploaded_since_added,
            }
            if seeded.mode != "seed" and entry.size:
                # Bytes received so far: a re-download is that far along (a byte received
                # twice counts twice, so it stays below 1.0 until the data is whole).
                answer["complete"] = min(0.999, counters.downloaded_since_added / entry.size)
            return answer

    def seeded(self) -> list[str]:
        with self._lock:
            return sorted(self._seeds)

    def stats(self) -> list[ImageStats]:
        out = []
        with self._lock:
            for image_id, seeded in sorted(self._seeds.items()):
                try:
                    counters = seeded.watch.counters()
                except RuntimeError:
                    continue
                out.append(
                    ImageStats(
                        image_id=image_id,
                        mode=seeded.mode,
                        peers=counters.peers,
                        upload_rate=counters.upload_rate,
                        uploaded=seeded.uploaded_earlier + counters.uploaded_since_added,
                        downloaded=counters.downloaded_since_added,
                        size=seeded.entry.size,
                    )
                )
        return out

    def log_stats(self) -> None:
        stats = self.stats()
        LOG.info(
            "Origin seeder: %d images, %d peers, uploading %.1f MiB/s (limit %s), %d MiB "
            "uploaded in %.0fs",
            len(stats),
            sum(s.peers for s in stats),
            sum(s.upload_rate for s in stats) / units.Mi,
            f"{self.opts.origin_upload_rate_limit // 1024} MiB/s"
            if self.opts.origin_upload_rate_limit
            else "none",
            self.uploaded_bytes() // units.Mi,
            time.monotonic() - self._started_at,
        )
        for s in stats:
            if s.peers or s.upload_rate or s.mode != "seed":
                LOG.info(
                    "  image %s (%s): %d peers, %.1f MiB/s, %d MiB uploaded = %.2fx the image",
                    s.image_id,
                    s.mode,
                    s.peers,
                    s.upload_rate / units.Mi,
                    s.uploaded // units.Mi,
                    s.uploaded / s.size if s.size else 0.0,
                )

    def __enter__(self) -> OriginSeeder:
        return self.start_in_thread()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
