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

import threading
from collections.abc import Callable
from typing import Any

from oslo_config import cfg
from oslo_log import log as logging
from stevedore import driver

from nova_torrent_images import conf as nti_conf
from nova_torrent_images import exception
from nova_torrent_images.compute import stores
from nova_torrent_images.compute.pipeline import ImagePipeline
from nova_torrent_images.compute.snapshots import uploads
from nova_torrent_images.compute.sources.base import ProgressCallback
from nova_torrent_images.compute.stores.base import BaseCopyStore
from nova_torrent_images.glance.client import GlanceClient

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
        engine: Any = None,
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
            lambda session: stores.open_store(self.conf, "xenapi", session=session)
        )
        self.engine = engine  # a started SwarmEngine; default: the process's own
        self._pipelines: dict[str, ImagePipeline] = {}
        self._pipelines_lock = threading.Lock()

    def pipeline(self, session: Any) -> ImagePipeline:
        """The pipeline of the store behind ``session``, recovered on first use."""
        store = self._store_factory(session)
        with self._pipelines_lock:
            pipeline = self._pipelines.get(store.name)
            if pipeline is None:
                pipeline = ImagePipeline(
                    self.conf,
                    store,
                    engine=self.engine,
                    seeding=self.use_torrent,
                    # Queued snapshot uploads are retried with the service's credentials.
                    glance_factory=lambda: self._glance_factory(None),
                )
                pipeline.start()
                self._pipelines[store.name] = pipeline
        return pipeline

    # -- the handler contract ----------------------------------------------------------
    def download_image(
        self, context: Any, session: Any, instance: Any, image_id: str
    ) -> dict[str, dict[str, str]]:
        glance = self._glance_factory(context)
        pipeline = self.pipeline(session)
        project_id = getattr(context, "project_id", None)
        try:
            image = glance.image_info(image_id)
        except exception.GlanceUnavailable as exc:
            # Glance is down: a verified base copy here may stand in (the zones design).
            image = pipeline.offline_image(image_id, project_id, exc)
        if self.use_torrent and not image.offline:
            # Popularity promotion counts boots here when configured so (never raises).
            record_request(image_id, self.conf)
        label = f"{_instance_label(instance)} root"
        delivery = pipeline.ensure_base(
            image,
            glance,
            use_torrent=self.use_torrent,
            progress=self.progress,
            # Cloned under the image's lock: eviction cannot take the base copy meanwhile.
            use=lambda base: pipeline.store.clone(base, label=label),
            project_id=project_id,
        )
        LOG.info(
            "Image %s: root disk VDI %s for %s (%s)",
            image_id,
            delivery.used,
            _instance_label(instance),
            "downloaded" if delivery.downloaded else "cache hit",
        )
        return {"root": {"uuid": delivery.used}}

    def upload_image(
        self, context: Any, session: Any, instance: Any, image_id: str, vdi_uuids: list[str]
    ) -> None:
        """Upload the instance's root disk (``vdi_uuids[0]``) as raw image data.

        The bytes are hashed on the way; when Glance's record of the image then shows that
        size and hash, a snapshot of the disk becomes the image's base copy here, so a
        restore on this host reads nothing from Glance. When Glance cannot take the upload,
        a read-only copy is kept and the upload queued (doc/source/snapshots.rst).
        """
        if not vdi_uuids:
            raise exception.StoreError(reason=f"no VDI given to upload as image {image_id}")
        glance = self._glance_factory(context)
        store = self._store_factory(session)
        if not store.capabilities.attach_for_upload:
            raise exception.StoreError(
                reason=f"{store.name} cannot attach disks; image {image_id} cannot be uploaded"
            )
        project_id = getattr(context, "project_id", None)
        ref = vdi_uuids[0]
        parent = None
        if self.conf.torrent_images.differential_snapshots and store.capabilities.adopts_disks:
            parent = store.parent_base(ref)  # the disk is a clone of this base copy
        sent = uploads.save(
            self.pipeline(session),
            glance,
            image_id,
            ref,
            parent,
            project_id,
            clear=uploads.not_inherited(self.conf),
        )
        if sent is not None:
            LOG.info(
                "Image %s: uploaded %d KiB from VDI %s of %s%s",
                image_id,
                sent.size >> 10,
                ref,
                _instance_label(instance),
                f", a delta against image {sent.parent_image}" if sent.parent_image else "",
            )

    def shutdown(self) -> None:
        """Stop seeding (detaching read-only views) before the process exits."""
        with self._pipelines_lock:
            for pipeline in self._pipelines.values():
                pipeline.shutdown()
            self._pipelines.clear()


class TorrentImageHandler(GlanceImageHandler):
    """Swarm first for raw torrentable images, straight into the VDI; then seeds them."""

    use_torrent = True


def load_handler(
    name: str | None = None, conf: cfg.ConfigOpts | None = None, **kwargs: Any
) -> GlanceImageHandler:
    """The image handler called ``name`` (default ``[torrent_images] image_handler``)."""
    conf = conf if conf is not None else cfg.CONF
    nti_conf.register_opts(conf)
    name = name or conf.torrent_images.image_handler
    try:
        manager: driver.DriverManager = driver.DriverManager(
            NAMESPACE, name, invoke_on_load=True, invoke_args=(conf,), invoke_kwds=kwargs
        )
    except (RuntimeError, driver.NoMatches) as exc:
        raise exception.ConfigError(
            option="image_handler",
            reason=f"no image handler {name!r} in entry point namespace {NAMESPACE}",
        ) from exc
    handler: Any = manager.driver  # an instance: invoke_on_load
    return handler


def record_request(image_id: str, conf: cfg.ConfigOpts | None = None) -> bool:
    """The image handler's hook: one request of ``image_id`` (``promotion_source = handler``).

    Returns whether this request made the image popular (publishing then runs in the
    background). A no-op returning False when promotion is off or counts notifications.
    Never raises: counting must not fail a boot.
    """
    conf = conf if conf is not None else cfg.CONF
    try:
        opts = conf.torrent_images
        if not opts.promotion_enabled or opts.promotion_source != "handler":
            return False
        # Only a process that counts here loads the publishing side (Glance, tracker,
        # registry, torrent creation); the default path above imports nothing of it.
        from nova_torrent_images.origin import promotion

        return promotion.handler_promoter(conf).record_request(image_id).promoted
    except Exception:  # noqa: BLE001  see the docstring
        LOG.exception("Counting a request of image %s for promotion failed", image_id)
        return False
