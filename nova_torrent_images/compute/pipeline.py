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
"""The one compute pipeline: make sure a verified base copy of an image exists, and use it.

Every caller goes through :meth:`ImagePipeline.ensure_base`: the XenAPI image handlers,
the libvirt hook, ``nova-torrent-images fetch`` (into the store, or with ``--output`` into
the output-file store), the demo, the benchmarks and the tests::

    policy.decide ─ once, from the Glance record and the store's disk formats
        │
    image lock ─ one download per image and host; held until the caller's use is done
        │
    usable base copy? ── yes ─→ touch, seed ─────────────────────────────┐
        │ no                                                              │
    download queue, room made (LRU eviction, counting running downloads) │
        │                                                                 │
    swarm into a store slot ─ verify ─ commit ─ save resume data ─ seed   │
        │ failed: slot aborted; fallback decided here, and only here      │
    Glance into a new slot ─ verified while streaming ─ commit            │
        │                                                                 │
        └──────────────→ use(base): clone (XenAPI), link (libvirt) ←──────┘

``[torrent_images] fallback_to_glance`` is read here and nowhere else. A caller that
brings no Glance client (the libvirt hook, whose fallback is Nova's own download) gets the
swarm's typed error instead of a Glance download and falls back itself.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from oslo_config import cfg
from oslo_log import log as logging

from nova_torrent_images import exception
from nova_torrent_images.common import qos
from nova_torrent_images.compute import chains, offline, policy
from nova_torrent_images.compute.delivery import Delivery
from nova_torrent_images.compute.locks import ImageLocks
from nova_torrent_images.compute.maintenance import Maintenance
from nova_torrent_images.compute.metrics import Metrics, get_metrics
from nova_torrent_images.compute.queue import DownloadQueue
from nova_torrent_images.compute.seeding import status as status_file
from nova_torrent_images.compute.seeding.eviction import (
    EvictionPolicy,
    EvictionSettings,
    usage_counter,
)
from nova_torrent_images.compute.seeding.resume import ResumeFiles
from nova_torrent_images.compute.seeding.seeds import SeedManager, SeedSettings
from nova_torrent_images.compute.snapshots import uploads
from nova_torrent_images.compute.snapshots.uploads import UploadQueue
from nova_torrent_images.compute.sources.base import FetchResult, ProgressCallback, Source
from nova_torrent_images.compute.sources.glance import GlanceSource
from nova_torrent_images.compute.sources.locations import LocationSettings, LocationsSource
from nova_torrent_images.compute.sources.swarm import SwarmSource
from nova_torrent_images.compute.stores.base import BaseCopy, BaseCopyStore, CommitInfo
from nova_torrent_images.glance.client import GlanceClient
from nova_torrent_images.glance.image import ImageInfo

if TYPE_CHECKING:  # libtorrent is loaded only when a swarm download runs
    from nova_torrent_images.swarm.engine import SwarmEngine
    from nova_torrent_images.swarm.transfer import TransferSettings

LOG = logging.getLogger(__name__)


class ImagePipeline:
    """Base copies of one store, kept and served by this process."""

    def __init__(
        self,
        conf: cfg.ConfigOpts,
        store: BaseCopyStore,
        *,
        engine: Any = None,
        queue: DownloadQueue | None = None,
        seeding: bool = True,
        metrics: Metrics | None = None,
        glance_factory: Callable[[], GlanceClient] | None = None,
        qos_settings: qos.Settings | None = None,
    ) -> None:
        """``engine`` is a started SwarmEngine (default: the process's, on first use).

        ``metrics`` default to the process's; only a seeding (long-running) pipeline writes
        ``[torrent_images] metrics_textfile``, the command line tools do not.
        ``glance_factory`` gives the Glance client queued snapshot uploads are retried with
        (:mod:`nova_torrent_images.compute.snapshots.uploads`); without it this process
        retries none. ``qos_settings`` default to ``[torrent_images] qos_*``.
        """
        opts = conf.torrent_images
        # How far below guests this pipeline's bulk work runs (given, or from conf).
        self.qos = qos_settings if qos_settings is not None else qos.Settings.from_conf(conf)
        self.conf = conf
        self.store = store
        self.engine = engine
        self.state_dir = opts.state_dir
        self.fallback_to_glance = opts.fallback_to_glance
        self.offline_boot_max_age = opts.offline_boot_max_age
        self.source_order = tuple(opts.source_order)
        self.verify_hash = opts.verify_image_hash
        self.metrics = metrics if metrics is not None else get_metrics()
        self.metrics_textfile = opts.metrics_textfile if seeding else None
        self.queue = queue or DownloadQueue(opts.max_concurrent_downloads)
        self.locks = ImageLocks.in_state_dir(opts.state_dir)
        self.resume = ResumeFiles.in_state_dir(opts.state_dir)
        self._transfer_settings: TransferSettings | None = None
        caps = store.capabilities
        self.seeds: SeedManager | None = None
        if seeding and caps.seeds and opts.seed_duration > 0:
            self.seeds = SeedManager(SeedSettings.from_conf(conf), store, self._engine, self.resume)
        # Boots and downloads per image lately: the weight that keeps popular base copies.
        self.usage = usage_counter(conf) if caps.keeps_base_copies else None
        self.eviction: EvictionPolicy | None = None
        if caps.keeps_base_copies:
            self.eviction = EvictionPolicy(
                EvictionSettings.from_conf(conf),
                store,
                self.resume,
                seeds=self.seeds,
                try_lock=self.locks.try_hold,
                usage=self.usage.counts if self.usage is not None else None,
            )
        tasks: list[Callable[[], object]] = []
        if self.eviction is not None:
            tasks.append(self.eviction.prune)
        if self.seeds is not None:
            tasks += [self.seeds.resume_all, self.write_status]
        tasks.append(self.write_metrics)
        self.uploads = UploadQueue(opts.state_dir)
        self._glance_factory = glance_factory if caps.adopts_disks else None
        if self._glance_factory is not None:
            tasks.append(self.retry_uploads)
            if self.seeds is not None:
                tasks.append(self.seed_published_snapshots)
        long_running = self.seeds is not None or self._glance_factory is not None
        self.maintenance = Maintenance(opts.prune_interval if long_running else 0, tasks)
        # The most recent download of each image by this object (for reports and demos).
        self.fetches: dict[str, FetchResult] = {}
        self._in_flight: dict[object, int] = {}  # bytes of downloads not yet committed
        self._in_flight_lock = threading.Lock()

    def _engine(self) -> SwarmEngine:
        if self.engine is None:
            from nova_torrent_images.swarm.engine import get_engine

            self.engine = get_engine(self.conf)
        return self.engine

    def _swarm(self, glance: GlanceClient | None = None) -> SwarmSource:
        """The swarm source; ``glance`` fills in what the swarm cannot deliver."""
        if self._transfer_settings is None:
            from nova_torrent_images.swarm.transfer import TransferSettings

            self._transfer_settings = TransferSettings.from_conf(self.conf)
        return SwarmSource(
            self._engine,
            self._transfer_settings,
            verify_hash=self.verify_hash,
            trust_torrent_root=self.conf.torrent_images.trust_torrent_root,
            will_seed=self.seeds is not None,
            glance=glance,
        )

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        """Recover after a restart: drop what crashes left, seed base copies again."""
        from nova_torrent_images.swarm.transfer import remove_stale_scratch

        self.store.remove_stale_slots(try_lock=self.locks.try_hold)
        remove_stale_scratch(self._swarm().settings.scratch_root)
        if self.store.capabilities.seeds:
            self.resume.remove_orphans(lambda: (b.image_id for b in self.store.list()))
        qos.apply_cgroup(self.conf, getattr(self.store, "directory", None) or self.state_dir)
        if self.seeds is not None:
            self.seeds.resume_all()
        self.maintenance.start()  # only in a long-running process (interval 0 otherwise)

    def shutdown(self) -> None:
        """Stop seeding (detaching read-only views); the engine is left to its owner."""
        self.maintenance.stop()
        if self.seeds is not None:
            self.seeds.shutdown()

    def write_status(self) -> None:
        """Publish this process's seeds for ``nova-torrent-images status``."""
        if self.seeds is not None:
            status_file.write(self.state_dir, self.store.name, self.seeds.status())

    def write_metrics(self) -> None:
        """Refresh the store, seed and queued-upload gauges, then write ``metrics_textfile``."""
        if self.store.capabilities.keeps_base_copies:
            self.metrics.observe_store(self.store, self.seeds)
        self.metrics.observe_uploads(self.uploads.list())
        if self.metrics_textfile:
            self.metrics.write_textfile(self.metrics_textfile)

    def _export_metrics(self) -> None:
        """After a request: the textfile, if any, never failing the request."""
        if not self.metrics_textfile:
            return
        try:
            self.write_metrics()
        except Exception as exc:  # noqa: BLE001  metrics must never fail a boot
            LOG.warning(
                "Cannot write [torrent_images] metrics_textfile %s: %s", self.metrics_textfile, exc
            )

    # -- snapshots (doc/source/snapshots.rst) ------------------------------------------
    def adopt_disk(self, image: ImageInfo, ref: str, project_id: str | None = None) -> BaseCopy:
        """Make the disk ``ref``, whose bytes were just uploaded as ``image``, its base copy.

        Registered like a download (the Glance record kept with it), under the image's
        lock; seeded when this process seeds and has the image's torrent metadata.
        """
        with self.locks.hold(image.id):
            base = self._usable_base(image)
            if base is None:
                commit = CommitInfo(
                    image, projects=(project_id,) if project_id else (), source=uploads.SNAPSHOT
                )
                base = self.store.adopt_disk(ref, commit)
            if self.seeds is not None:
                self.seeds.start(base)
        self._export_metrics()
        return base

    def seed_published_snapshots(self) -> list[str]:
        """Seed snapshots this host saved once they are published (a maintenance task)."""
        if self._glance_factory is None or self.seeds is None:
            return []
        if not any(b.source == uploads.SNAPSHOT for b in self.store.list()):
            return []
        return uploads.seed_published_snapshots(self, self._glance_factory())

    def retry_uploads(self, *, force: bool = False) -> list[str]:
        """Upload what waits in the queue and is due (a maintenance task)."""
        if self._glance_factory is None:
            return []
        if not self.uploads.list() and not self.store.kept_for_upload():
            return []  # nothing queued: no Glance client made
        return self.uploads.run_due(
            self.store,
            self._glance_factory(),
            self.adopt_disk,
            os.path.join(self.state_dir, "deltas"),
            force=force,
        )

    # -- the pipeline ------------------------------------------------------------------
    def ensure_base(
        self,
        image: ImageInfo,
        glance: GlanceClient | None,
        *,
        use_torrent: bool = True,
        progress: ProgressCallback | None = None,
        use: Callable[[BaseCopy], Any] | None = None,
        project_id: str | None = None,
    ) -> Delivery:
        """The verified base copy of ``image``, downloaded if need be, then ``use(base)``.

        ``use`` runs under the image's lock, so the base copy cannot be evicted before it
        is cloned or linked. ``glance=None`` means the caller is the fallback (Nova's own
        download in the libvirt integration): an image policy keeps off the swarm raises
        :class:`NotTorrentable`, a swarm failure :class:`TorrentFetchError` (the slot
        destroyed first), and with fallback off :class:`FetchFailed`. ``project_id`` is the
        project Glance just showed ``image`` to; the base copy remembers it, for boots while
        Glance is down (:meth:`offline_image`).
        """
        if image.status not in (None, "active") and not image.offline:
            # Glance's answer overrides what this host kept: a deactivated image is one
            # its owner or an administrator withdrew, whatever base copy remains here.
            # Boots while Glance is down must see the withdrawal too: the base copy keeps
            # this record (its status) from now on.
            if self.store.capabilities.keeps_base_copies:
                with self.locks.hold(image.id):
                    base = self.store.lookup(image.id)
                    if base is not None:
                        offline.refresh_record(self.store, self.state_dir, base, image, project_id)
            raise exception.ImageNotActive(image_id=image.id, status=image.status)
        self._count_use(image.id)
        if image.parent_id:
            return chains.ensure_chain(
                self, image, glance, use_torrent, progress=progress, use=use, project_id=project_id
            )
        decision = policy.decide(
            image, self.conf, disk_formats=self.store.capabilities.disk_formats
        )
        if (
            glance is None
            and not (use_torrent and decision)
            and not image.offline
            and not self._has_base(image)  # a kept snapshot, or a base copy from before
        ):
            raise exception.NotTorrentable(
                image_id=image.id,
                reason=decision.reason if use_torrent else "the caller asked for no torrent",
            )
        with self.locks.hold(image.id):
            delivery = self.reuse_base(image, project_id, use)
            if delivery is not None:
                self._export_metrics()
                return delivery
            if glance is None and not (use_torrent and decision) and not image.offline:
                raise exception.NotTorrentable(  # the base copy went meanwhile
                    image_id=image.id,
                    reason=decision.reason if use_torrent else "the caller asked for no torrent",
                )
            try:
                with self.queue.slot(image.id):
                    base, fetched = self._download(
                        image, glance, decision if use_torrent else None, progress, project_id
                    )
            finally:
                self._export_metrics()
            self.fetches[image.id] = fetched
            return Delivery(base, True, fetched, used=use(base) if use else None)

    def offline_image(
        self, image_id: str, project_id: str | None, glance_error: Exception
    ) -> ImageInfo:
        """The image as Glance last showed it, for a boot while Glance is unreachable.

        See :func:`nova_torrent_images.compute.offline.offline_image`.
        """
        return offline.offline_image(
            self.store, self.conf, image_id, project_id, glance_error, self.offline_boot_max_age
        )

    def reuse_base(
        self,
        image: ImageInfo,
        project_id: str | None,
        use: Callable[[BaseCopy], Any] | None,
    ) -> Delivery | None:
        """The usable base copy of ``image``, touched, seeded and used; None if there is none.

        Call under the image's lock. Unless ``image`` is itself the kept record (an offline
        boot), the base copy keeps ``image``'s record from now on, and ``project_id``
        (Glance just showed the image to it), for boots while Glance is down
        (:func:`nova_torrent_images.compute.offline.refresh_record`).
        """
        base = self._usable_base(image)
        if base is None:
            return None
        LOG.info(
            "Image %s: base copy %s found in %s; nothing downloaded",
            image.id,
            base.ref,
            self.store.name,
        )
        self.store.touch(base)
        if not image.offline:
            # Glance just answered: its record, not the one kept from an earlier boot, is
            # what boots while Glance is down rely on from now on (and project_id is one
            # Glance showed the image to).
            offline.refresh_record(self.store, self.state_dir, base, image, project_id)
        if self.seeds is not None:
            self.seeds.start(base)
        self.metrics.base_copy_hit()
        return Delivery(base, False, used=use(base) if use else None)

    def _count_use(self, image_id: str) -> None:
        """One more boot or download of the image (its eviction weight); never fails one."""
        if self.usage is None:
            return
        try:
            self.usage.record(image_id)
        except Exception:  # noqa: BLE001  a count must not fail a boot
            LOG.exception("Image %s: counting its use for eviction failed", image_id)

    def _has_base(self, image: ImageInfo) -> bool:
        if not self.store.capabilities.keeps_base_copies:
            return False
        base = self.store.lookup(image.id)
        return base is not None and base.matches(image)

    def _usable_base(self, image: ImageInfo) -> BaseCopy | None:
        base = self.store.lookup(image.id)
        if base is None:
            return None
        if not base.matches(image):
            LOG.warning(
                "Image %s: base copy %s does not match Glance's record (hash or "
                "size changed); it is not used",
                image.id,
                base.ref,
            )
            if not base.in_use:
                if self.seeds is not None:
                    self.seeds.stop(image.id)
                self.store.destroy(base)
                self.resume.remove(image.id)
            return None
        return base

    def _download(
        self,
        image: ImageInfo,
        glance: GlanceClient | None,
        decision: policy.Decision | None,
        progress: ProgressCallback | None,
        project_id: str | None,
    ) -> tuple[BaseCopy, FetchResult]:
        image.require_verifiable()
        commit = CommitInfo(image, projects=(project_id,) if project_id else ())
        if image.torrent_error is not None:
            LOG.warning("%s; the image is fetched from Glance", image.torrent_error)
        with self.reservation(image.size) as token:
            fallback_reason = None
            formats = self.store.capabilities.disk_formats
            order = self.source_order
            for step in order:
                if step == "torrent":
                    if not decision:
                        if decision is not None:
                            LOG.info("Image %s: not by torrent: %s", image.id, decision.reason)
                        continue
                    try:
                        # Glance fills in only what the swarm lacks (its origin gone, a
                        # stall) where the operator lets Glance be a source at all.
                        fill = glance if self.fallback_to_glance and "glance" in order else None
                        return self.fetch(commit, self._swarm(fill), progress, token)
                    except exception.TorrentFetchError as exc:
                        # The one place that decides what a swarm failure leads to.
                        if not self.fallback_to_glance:
                            raise exception.FetchFailed(
                                image_id=image.id,
                                reason=f"{exc}; [torrent_images] fallback_to_glance is off",
                            ) from exc
                        if glance is None:
                            raise  # the caller falls back itself
                        LOG.warning(
                            "Image %s: swarm download failed, its download slot destroyed; "
                            "falling back to the next source: %s",
                            image.id,
                            exc,
                        )
                        fallback_reason = str(exc)
                    continue
                if glance is None:
                    continue  # the caller's own download is the fallback (libvirt: Nova's)
                if formats is not None and image.disk_format not in formats:
                    raise exception.StoreError(
                        reason=f"image {image.id} is {image.disk_format}; {self.store.name} "
                        f"takes only {', '.join(formats)} images written as they are"
                    )
                if step == "locations":
                    locations = self._locations()
                    if not locations.available(image):
                        continue
                    try:
                        base, result = self.fetch(commit, locations, progress, token)
                    except exception.TorrentImagesError as exc:
                        LOG.warning("Image %s: %s; on to the next source", image.id, exc)
                        fallback_reason = fallback_reason or str(exc)
                        continue
                else:
                    glance_source = GlanceSource(glance, verify_hash=self.verify_hash)
                    base, result = self.fetch(commit, glance_source, progress, token)
                result.fallback_reason = fallback_reason
                return base, result
            raise exception.FetchFailed(
                image_id=image.id,
                reason=f"no source in [torrent_images] source_order={','.join(self.source_order)}"
                f" could deliver it{': ' + fallback_reason if fallback_reason else ''}",
            )

    def _locations(self) -> LocationsSource:

        return LocationsSource(LocationSettings.from_conf(self.conf), verify_hash=self.verify_hash)

    def fetch(
        self,
        commit: CommitInfo,
        source: Source,
        progress: ProgressCallback | None,
        token: object,
        from_base: BaseCopy | None = None,
    ) -> tuple[BaseCopy, FetchResult]:
        """One source into one new slot, committed; the slot is aborted on any failure.

        ``from_base``: the slot starts as a copy-on-write clone of that base copy.
        """
        image = commit.image
        if self.eviction is not None:
            self.eviction.make_room(image.id, image.size, in_flight=self._others_in_flight(token))
        if from_base is not None:
            slot = self.store.begin_from(from_base, image.id, image.size)
        else:
            slot = self.store.begin_download(image.id, image.size)
        try:
            # Below guests: the hash check and the Glance path on this thread (the
            # priority is given back after), libtorrent's threads are lowered already.
            with qos.background(self.qos):
                result = source.fetch_into(image, slot, progress)
            commit.source = result.source
            base = self.store.commit(slot, commit)
        except BaseException as exc:
            self.store.abort(slot)
            if isinstance(exc, Exception):
                self.metrics.fetch_failed(source.name, exc)
            raise
        self.metrics.fetch_succeeded(result)
        result.destination = base.ref  # the slot is gone; the base copy is where it went
        if result.resume_data and self.store.capabilities.seeds:
            # Saved whether or not this process seeds: the long-running one adopts it.
            self.resume.save(image.id, result.resume_data)
        if self.seeds is not None:
            self.seeds.start(base)
        return base, result

    # -- downloads of this process, for the quota ------------------------------------
    @contextlib.contextmanager
    def reservation(self, size: int) -> Iterator[object]:
        token = object()
        with self._in_flight_lock:
            self._in_flight[token] = size
        try:
            yield token
        finally:
            with self._in_flight_lock:
                del self._in_flight[token]

    def _others_in_flight(self, token: object) -> int:
        with self._in_flight_lock:
            return sum(size for t, size in self._in_flight.items() if t is not token)


def fetch_to_file(
    image: ImageInfo,
    path: str,
    *,
    conf: cfg.ConfigOpts,
    glance: GlanceClient | None,
    engine: Any = None,
    progress: ProgressCallback | None = None,
) -> FetchResult:
    """The verified image into a new file ``path`` (``fetch --output``), through the pipeline.

    The output-file store is a store like the others: the same policy, swarm, verification
    and fallback as a boot, and a file that appears under its name only when verified.
    """
    from nova_torrent_images.compute import stores

    store = stores.open_store(conf, "output-file", path=path)
    pipeline = ImagePipeline(conf, store, engine=engine, seeding=False)
    store.remove_stale_slots()
    return pipeline.ensure_base(image, glance, progress=progress).fetch
