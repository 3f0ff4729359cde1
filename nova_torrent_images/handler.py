"""Image handlers for the XenAPI virt driver: ``torrent`` and plain ``glance``.

The contract is the one Nova's XenAPI driver used for its image handlers::

    download_image(context, session, instance, image_id) -> {'root': {'uuid': vdi_uuid}}
    upload_image(context, session, instance, image_id, vdi_uuids) -> None

Both handlers keep a read-only base copy per image in the SR and give every instance a
copy-on-write clone of it, so a second boot reads nothing from Glance or the swarm. The
torrent handler writes raw torrentable images from the swarm straight into a VDI; anything
else, and any swarm failure (after the failed download VDI is destroyed), goes through the
plain handler, which streams the image from Glance into a VDI with hash verification.

Handlers are loaded by name through stevedore (:func:`load_handler`), from the
``nova_torrent_images.image_handlers`` entry point namespace, as chosen by
``[torrent_images] image_handler``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from oslo_concurrency import lockutils
from oslo_config import cfg
from oslo_log import log as logging
from stevedore import driver

from nova_torrent_images import conf as nti_conf
from nova_torrent_images import exception, policy
from nova_torrent_images.fetch import fetch_by_torrent, fetch_from_glance
from nova_torrent_images.glance import GlanceClient
from nova_torrent_images.image import ImageInfo
from nova_torrent_images.stores.base import BaseCopy, BaseCopyStore, CommitInfo
from nova_torrent_images.stores.xenapi import XenAPIStore
from nova_torrent_images.swarm.engine import SwarmEngine

LOG = logging.getLogger(__name__)

NAMESPACE = "nova_torrent_images.image_handlers"

GlanceFactory = Callable[[Any], GlanceClient]
StoreFactory = Callable[[Any], BaseCopyStore]


def _instance_label(instance: Any) -> str:
    for key in ("name", "uuid"):
        try:
            value = instance[key]
        except (KeyError, TypeError, AttributeError):
            value = getattr(instance, key, None)
        if value:
            return str(value)
    return "instance"


class GlanceImageHandler:
    """Plain handler: verified Glance HTTP stream into a VDI, kept as a base copy."""

    def __init__(
        self,
        conf: cfg.ConfigOpts | None = None,
        *,
        glance_factory: GlanceFactory | None = None,
        store_factory: StoreFactory | None = None,
        engine: SwarmEngine | None = None,
    ) -> None:
        self.conf = conf if conf is not None else cfg.CONF
        nti_conf.register_opts(self.conf)
        self._glance_factory = glance_factory or (
            lambda context: GlanceClient.for_context(context, self.conf)
        )
        self._store_factory = store_factory or (
            lambda session: XenAPIStore.from_conf(session, self.conf)
        )
        self.engine = engine
        self._lock_path = os.path.join(self.conf.torrent_images.state_dir, "locks")

    # -- the handler contract ----------------------------------------------------------
    def download_image(
        self, context: Any, session: Any, instance: Any, image_id: str
    ) -> dict[str, dict[str, str]]:
        glance = self._glance_factory(context)
        image = glance.image_info(image_id)
        store = self._store_factory(session)
        # One download per image and host: concurrent boots of the same image wait here
        # and then clone the base copy the first one made.
        with lockutils.lock(f"nti-image-{image_id}", external=True, lock_path=self._lock_path):
            base = self._usable_base(store, image)
            if base is None:
                base = self._download(store, image, glance)
            else:
                LOG.info(
                    "Image %s: base copy %s found in %s; cloning, nothing downloaded",
                    image_id,
                    base.ref,
                    store.name,
                )
        root = store.clone(base, label=f"{_instance_label(instance)} root")
        LOG.info("Image %s: root disk VDI %s for %s", image_id, root, _instance_label(instance))
        return {"root": {"uuid": root}}

    def upload_image(
        self, context: Any, session: Any, instance: Any, image_id: str, vdi_uuids: list[str]
    ) -> None:
        """Upload the instance's root disk (``vdi_uuids[0]``) as raw image data."""
        if not vdi_uuids:
            raise exception.StoreError(reason=f"no VDI given to upload as image {image_id}")
        glance = self._glance_factory(context)
        store = self._store_factory(session)
        with store.attached(vdi_uuids[0], "RO") as path:
            size = _device_size(path)
            with open(path, "rb") as data:
                glance.upload(image_id, _Limited(data, size), size)
        LOG.info(
            "Image %s: uploaded %d MiB from VDI %s of %s",
            image_id,
            size >> 20,
            vdi_uuids[0],
            _instance_label(instance),
        )

    # -- steps -------------------------------------------------------------------------
    def _usable_base(self, store: BaseCopyStore, image: ImageInfo) -> BaseCopy | None:
        base = store.lookup(image.id)
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
                store.destroy(base)
            return None
        return base

    def _download(self, store: BaseCopyStore, image: ImageInfo, glance: GlanceClient) -> BaseCopy:
        return self._download_from_glance(store, image, glance)

    def _download_from_glance(
        self, store: BaseCopyStore, image: ImageInfo, glance: GlanceClient
    ) -> BaseCopy:
        if store.disk_formats is not None and image.disk_format not in store.disk_formats:
            raise exception.StoreError(
                reason=f"image {image.id} is {image.disk_format}; {store.name} takes only "
                f"{', '.join(store.disk_formats)} images written as they are"
            )
        image.require_verifiable()
        slot = store.begin_download(image.id, image.size)
        try:
            fetch_from_glance(image, slot.path, conf=self.conf, glance=glance, preallocated=True)
            return store.commit(slot, CommitInfo(image))
        except BaseException:
            store.abort(slot)
            raise


class TorrentImageHandler(GlanceImageHandler):
    """Swarm first for raw torrentable images, straight into the VDI; else plain."""

    def _download(self, store: BaseCopyStore, image: ImageInfo, glance: GlanceClient) -> BaseCopy:
        decision = policy.decide(image, self.conf, disk_formats=store.disk_formats)
        if image.torrent_error is not None:
            LOG.warning("%s; the image is fetched from Glance", image.torrent_error)
        if not decision:
            LOG.info("Image %s: plain Glance download: %s", image.id, decision.reason)
            return self._download_from_glance(store, image, glance)
        slot = store.begin_download(image.id, image.size)
        try:
            fetch_by_torrent(
                image, slot.path, conf=self.conf, engine=self.engine, preallocated=True
            )
            return store.commit(slot, CommitInfo(image))
        except exception.TorrentFetchError as exc:
            store.abort(slot)
            if not self.conf.torrent_images.fallback_to_glance:
                raise exception.FetchFailed(
                    image_id=image.id, reason=f"{exc}; [torrent_images] fallback_to_glance is off"
                ) from exc
            LOG.warning(
                "Image %s: swarm download failed, download VDI destroyed; falling "
                "back to the plain Glance handler: %s",
                image.id,
                exc,
            )
        except BaseException:
            store.abort(slot)
            raise
        return self._download_from_glance(store, image, glance)


class _Limited:
    """A read-only file view of the first ``size`` bytes (a device may be larger)."""

    def __init__(self, f: Any, size: int) -> None:
        self._f, self._left = f, size

    def read(self, n: int = -1) -> bytes:
        n = self._left if n is None or n < 0 else min(n, self._left)
        data = self._f.read(n)
        self._left -= len(data)
        return data


def _device_size(path: str) -> int:
    with open(path, "rb") as f:
        return f.seek(0, os.SEEK_END)


def load_handler(
    name: str | None = None, conf: cfg.ConfigOpts | None = None, **kwargs: Any
) -> GlanceImageHandler:
    """The image handler called ``name`` (default ``[torrent_images] image_handler``)."""
    conf = conf if conf is not None else cfg.CONF
    nti_conf.register_opts(conf)
    name = name or conf.torrent_images.image_handler
    try:
        manager = driver.DriverManager(
            NAMESPACE, name, invoke_on_load=True, invoke_args=(conf,), invoke_kwds=kwargs
        )
    except (RuntimeError, driver.NoMatches) as exc:
        raise exception.ConfigError(
            option="image_handler",
            reason=f"no image handler {name!r} in entry point namespace {NAMESPACE}",
        ) from exc
    return manager.driver
