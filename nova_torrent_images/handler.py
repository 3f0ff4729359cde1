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
import threading
from collections.abc import Callable
from typing import Any

from oslo_config import cfg
from oslo_log import log as logging
from stevedore import driver

from nova_torrent_images import conf as nti_conf
from nova_torrent_images import exception
from nova_torrent_images.fetch import ProgressCallback
from nova_torrent_images.glance import GlanceClient
from nova_torrent_images.local import LocalImages
from nova_torrent_images.origin import promotion
from nova_torrent_images.stores.base import BaseCopyStore
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

    use_torrent = False

    def __init__(
        self,
        conf: cfg.ConfigOpts | None = None,
        *,
        glance_factory: GlanceFactory | None = None,
        store_factory: StoreFactory | None = None,
        engine: SwarmEngine | None = None,
        progress: ProgressCallback | None = None,
    ) -> None:
        self.conf = conf if conf is not None else cfg.CONF
        self.progress = progress  # for CLIs and demos; Nova passes none
        nti_conf.register_opts(self.conf)
        nti_conf.check(self.conf)
        self._glance_factory = glance_factory or (
            lambda context: GlanceClient.for_context(context, self.conf)
        )
        self._store_factory = store_factory or (
            lambda session: XenAPIStore.from_conf(session, self.conf)
        )
        self.engine = engine
        self._locals: dict[str, LocalImages] = {}
        self._locals_lock = threading.Lock()

    def local_images(self, session: Any) -> LocalImages:
        """The base copies of the store behind ``session``, recovered on first use."""
        store = self._store_factory(session)
        with self._locals_lock:
            local = self._locals.get(store.name)
            if local is None:
                local = LocalImages(self.conf, store, engine=self.engine, seeding=self.use_torrent)
                local.start()
                self._locals[store.name] = local
        return local

    # -- the handler contract ----------------------------------------------------------
    def download_image(
        self, context: Any, session: Any, instance: Any, image_id: str
    ) -> dict[str, dict[str, str]]:
        glance = self._glance_factory(context)
        image = glance.image_info(image_id)
        if self.use_torrent:
            # Popularity promotion counts boots here when configured so (never raises).
            promotion.record_request(image_id, self.conf)
        local = self.local_images(session)
        base, downloaded = local.ensure_base(
            image, glance, use_torrent=self.use_torrent, progress=self.progress
        )
        root = local.store.clone(base, label=f"{_instance_label(instance)} root")
        LOG.info(
            "Image %s: root disk VDI %s for %s (%s)",
            image_id,
            root,
            _instance_label(instance),
            "downloaded" if downloaded else "cache hit",
        )
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

    def shutdown(self) -> None:
        """Stop seeding (detaching read-only views) before the process exits."""
        with self._locals_lock:
            for local in self._locals.values():
                if local.seeds is not None:
                    local.seeds.shutdown()
            self._locals.clear()


class TorrentImageHandler(GlanceImageHandler):
    """Swarm first for raw torrentable images, straight into the VDI; then seeds them."""

    use_torrent = True


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
