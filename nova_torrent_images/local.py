"""The host-side pipeline every integration shares: make sure a verified base copy exists.

:class:`LocalImages` ties one store to the swarm, Glance and the seeds of this process:
lookup, one download per image (a lock), a per-host download queue, room made by the
eviction policy, torrent first for images policy allows (straight into the store's slot),
plain verified Glance otherwise or after a swarm failure (the failed slot destroyed
first), commit to a read-only base copy, and seeding of what came from the swarm.
"""

from __future__ import annotations

import os

from oslo_concurrency import lockutils
from oslo_config import cfg
from oslo_log import log as logging

from nova_torrent_images import exception, policy
from nova_torrent_images.fetch import (
    FetchResult,
    ProgressCallback,
    fetch_by_torrent,
    fetch_from_glance,
)
from nova_torrent_images.glance import GlanceClient
from nova_torrent_images.image import ImageInfo
from nova_torrent_images.seeding import DownloadQueue, SeedManager
from nova_torrent_images.stores.base import BaseCopy, BaseCopyStore, CommitInfo
from nova_torrent_images.swarm.engine import SwarmEngine, get_engine

LOG = logging.getLogger(__name__)


class LocalImages:
    """Base copies of one store, kept and served by this process."""

    def __init__(
        self,
        conf: cfg.ConfigOpts,
        store: BaseCopyStore,
        *,
        engine: SwarmEngine | None = None,
        queue: DownloadQueue | None = None,
        seeding: bool = True,
    ) -> None:
        self.conf = conf
        self.opts = conf.torrent_images
        self.store = store
        self.engine = engine
        self.queue = queue or DownloadQueue(self.opts.max_concurrent_downloads)
        self._lock_path = os.path.join(self.opts.state_dir, "locks")
        # The most recent download of each image by this object (for reports and demos).
        self.fetches: dict[str, FetchResult] = {}
        self.seeds: SeedManager | None = None
        if seeding and self.opts.seed_duration > 0:
            self.seeds = SeedManager(conf, store, self._engine())

    def _engine(self) -> SwarmEngine:
        if self.engine is None:
            self.engine = get_engine(self.conf)
        return self.engine

    def start(self) -> None:
        """Recover after a restart: drop stale slots, seed base copies again."""
        remove_stale = getattr(self.store, "remove_stale_slots", None)
        if remove_stale is not None:
            remove_stale()
        if self.seeds is not None:
            self.seeds.resume_all()
            self.seeds.start_periodic()

    def ensure_base(
        self,
        image: ImageInfo,
        glance: GlanceClient | None,
        *,
        use_torrent: bool = True,
        progress: ProgressCallback | None = None,
    ) -> tuple[BaseCopy, bool]:
        """The verified base copy of ``image``; True when this call downloaded it.

        ``glance=None`` means the caller is the fallback (Nova's own download in the
        libvirt integration): a swarm failure raises ``TorrentFetchError`` (the slot
        destroyed first) and an image policy keeps off the swarm raises ``NotTorrentable``.
        """
        # One download per image and host: concurrent requests wait here, then find the
        # base copy the first one made.
        with lockutils.lock(f"nti-image-{image.id}", external=True, lock_path=self._lock_path):
            base = self._usable_base(image)
            if base is not None:
                LOG.info(
                    "Image %s: base copy %s found in %s; nothing downloaded",
                    image.id,
                    base.ref,
                    self.store.name,
                )
                self.store.touch(base)
                if self.seeds is not None:
                    self.seeds.start(base)
                return base, False
            with self.queue.slot(image.id):
                if self.seeds is not None:
                    self.seeds.make_room(image.id, image.size)
                return self._download(image, glance, use_torrent, progress), True

    def _usable_base(self, image: ImageInfo) -> BaseCopy | None:
        base = self.store.lookup(image.id)
        if base is None:
            return None
        if (base.hash_algo, base.hash_value, base.size) != (
            image.hash_algo,
            image.hash_value,
            image.size,
        ):
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
            return None
        return base

    def _download(
        self,
        image: ImageInfo,
        glance: GlanceClient | None,
        use_torrent: bool,
        progress: ProgressCallback | None,
    ) -> BaseCopy:
        image.require_verifiable()
        decision = policy.decide(image, self.conf, disk_formats=self.store.disk_formats)
        if image.torrent_error is not None:
            LOG.warning("%s; the image is fetched from Glance", image.torrent_error)
        if use_torrent and decision:
            base = self._download_by_torrent(image, progress, glance_fallback=glance is not None)
            if base is not None:
                return base
        elif glance is None:
            raise exception.NotTorrentable(
                image_id=image.id,
                reason=decision.reason if use_torrent else "the caller asked for no torrent",
            )
        elif use_torrent:
            LOG.info("Image %s: plain Glance download: %s", image.id, decision.reason)
        return self._download_from_glance(image, glance)

    def _download_by_torrent(
        self, image: ImageInfo, progress: ProgressCallback | None, glance_fallback: bool = True
    ) -> BaseCopy | None:
        slot = self.store.begin_download(image.id, image.size)
        preallocated = os.path.exists(slot.path)
        try:
            result = fetch_by_torrent(
                image,
                slot.path,
                conf=self.conf,
                engine=self._engine(),
                progress=progress,
                preallocated=preallocated,
            )
            base = self.store.commit(slot, CommitInfo(image))
            self.fetches[image.id] = result
        except exception.TorrentFetchError as exc:
            self.store.abort(slot)
            if not self.opts.fallback_to_glance:
                raise exception.FetchFailed(
                    image_id=image.id, reason=f"{exc}; [torrent_images] fallback_to_glance is off"
                ) from exc
            if not glance_fallback:
                raise  # the caller falls back itself
            LOG.warning(
                "Image %s: swarm download failed, its download slot destroyed; "
                "falling back to a verified Glance download: %s",
                image.id,
                exc,
            )
            return None
        except BaseException:
            self.store.abort(slot)
            raise
        if self.seeds is not None:
            self.seeds.register_download(base, result.resume_data)
        return base

    def _download_from_glance(self, image: ImageInfo, glance: GlanceClient) -> BaseCopy:
        formats = self.store.disk_formats
        if formats is not None and image.disk_format not in formats:
            raise exception.StoreError(
                reason=f"image {image.id} is {image.disk_format}; {self.store.name} takes only "
                f"{', '.join(formats)} images written as they are"
            )
        slot = self.store.begin_download(image.id, image.size)
        try:
            self.fetches[image.id] = fetch_from_glance(
                image,
                slot.path,
                conf=self.conf,
                glance=glance,
                preallocated=os.path.exists(slot.path),
            )
            return self.store.commit(slot, CommitInfo(image))
        except BaseException:
            self.store.abort(slot)
            raise
