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

"""libvirt integration: snapshots go through this library's upload path.

Nova's libvirt driver saves a snapshot by extracting the disk into a file (qcow2 or raw,
``snapshot_extract``) and handing the open file to ``GlanceImageServiceV2.update(context,
image_id, metadata, data=file)``, which writes the record, sends the data with
``_upload_data`` and reads the record back. :func:`install` wraps ``update`` (as
:mod:`.glance_download` wraps ``download``) for data that is a file, and does what the
XenAPI image handler does (:func:`nova_torrent_images.compute.snapshots.uploads.save`):

1. with ``[torrent_images] differential_snapshots``, the parent is the base copy the
   instance disk (``<instances_path>/<instance_uuid>/disk``, named by the record) is a
   qcow2 overlay of, else the base copy of the record's ``base_image_ref``; it must hold
   raw bytes. A qcow2 extract is then converted to raw in the store (the delta and
   ``nti_whole_hash`` are of the raw image);
2. Nova's own ``update`` writes the record (no data), as Nova would;
3. the data is sent whole or as a delta, hashed on the way, after removing properties
   the record inherited from the booted image (:func:`~.uploads.not_inherited`);
4. when Glance's size and hash are those sent, the file becomes the image's base copy;
5. when Glance cannot take it (steps 1 to 3), a read-only copy is kept in the store
   (``uploads/``, tagged) and the upload queued with Nova's record, retried with backoff
   by the long-running process, across restarts.

Without a Glance client of this library's own (``[torrent_images] glance_endpoint`` or
``[torrent_images_glance]``) Nova uploads as before and the host keeps the file as a base
copy afterwards (:func:`keep_snapshot`). A failure of this library's path before any data
went out hands the upload back to Nova; Glance's own refusals reach Nova as its errors.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import stat
from collections.abc import Callable, Iterator
from typing import Any

from nova import exception as nova_exception
from nova.image import glance as nova_glance
from oslo_log import log as logging

from nova_torrent_images import exception
from nova_torrent_images.compute.snapshots import differential, uploads
from nova_torrent_images.compute.stores.base import BaseCopy, BaseCopyStore
from nova_torrent_images.glance import image as image_record
from nova_torrent_images.glance import verify
from nova_torrent_images.glance.client import UPDATE, GlanceClient
from nova_torrent_images.glance.image import parse_image

LOG = logging.getLogger(__name__)

_TARGET = nova_glance.GlanceImageServiceV2
_ORIGINAL_ATTR = "_nova_torrent_images_original"


def keep_snapshot(hook: Any, context: Any, image_id: str, data: Any, record: Any) -> bool:
    """Keep the file ``data`` Nova uploaded as the base copy of ``image_id``; never raises."""
    try:
        path = _file_of(data)
        if path is None:
            return False
        conf = hook.conf.torrent_images
        image = parse_image(
            dict(record),
            torrentable_property=conf.torrentable_property,
            magnet_property=conf.magnet_property,
        )
        if not image.hash_algo or not image.hash_value or image.size != os.path.getsize(path):
            LOG.info("Image %s: Glance's record does not describe %s; not kept", image_id, path)
            return False
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, image.hash_algo).hexdigest()
        if digest != image.hash_value:
            LOG.warning(
                "Image %s: Glance's %s hash differs from the snapshot file %s; not kept",
                image_id,
                image.hash_algo,
                path,
            )
            return False
        base = hook.pipeline().adopt_disk(image, path, getattr(context, "project_id", None))
        LOG.info("Image %s: the snapshot is kept as base copy %s", image_id, base.ref)
        return True
    except Exception:  # noqa: BLE001  the snapshot is in Glance; only the local copy is lost
        LOG.warning("Image %s: snapshot uploaded, but not kept here", image_id, exc_info=True)
        return False


def _file_of(data: Any) -> str | None:
    path = getattr(data, "name", None)
    try:
        return path if isinstance(path, str) and stat.S_ISREG(os.stat(path).st_mode) else None
    except OSError:
        return None


def holds_raw(base: BaseCopy) -> bool:
    """Whether a base copy holds a raw image (a delta is against raw bytes only).

    A whole image uploaded as raw, or the rebuilt whole image of a differential one.
    """
    return base.record.get("disk_format") == "raw" or bool(
        base.record.get(image_record.PARENT_PROPERTY)
    )


def glance_fields(image_meta: dict[str, Any]) -> dict[str, Any]:
    """Nova's snapshot metadata as the Glance record fields Nova's ``update`` would set."""
    fields = nova_glance._translate_to_glance(image_meta)
    for name in ("id", "image_id", "location"):
        fields.pop(name, None)
    return {k: v for k, v in fields.items() if v is not None}


class SnapshotUpload:
    """One ``update(..., data=file)`` of Nova's libvirt driver, through this library."""

    def __init__(
        self,
        hook: Any,
        service: nova_glance.GlanceImageServiceV2,
        original: Callable[..., Any],
        context: Any,
        image_id: str,
        image_meta: dict[str, Any],
        path: str,
        purge_props: bool,
    ) -> None:
        self.hook, self.service, self.original = hook, service, original
        self.context, self.image_id, self.path = context, image_id, path
        self.image_meta, self.purge_props = dict(image_meta), purge_props
        self.conf = hook.conf
        self.project_id = getattr(context, "project_id", None)
        self.record: Any = None  # what Nova's own update returned

    def run(self, glance: GlanceClient) -> Any:
        pipeline = self.hook.pipeline()
        store = pipeline.store
        unavailable: exception.GlanceUnavailable | None = None
        parent = None
        if self.conf.torrent_images.differential_snapshots:
            try:
                parent = self._parent(glance, store)
            except exception.GlanceUnavailable as exc:
                unavailable = exc  # no record: Nova's update would fail the same way
        disk_format = self.image_meta.get("disk_format") or "raw"
        with self._disk(store, parent, disk_format) as (ref, fmt, parent):
            self.image_meta["disk_format"] = fmt
            fields = glance_fields(self.image_meta)

            def nova_update() -> None:
                if unavailable is not None:
                    raise unavailable
                try:
                    self.record = self.original(
                        self.service,
                        self.context,
                        self.image_id,
                        self.image_meta,
                        data=None,
                        purge_props=self.purge_props,
                    )
                except nova_exception.GlanceConnectionFailed as exc:
                    raise exception.GlanceUnavailable(
                        image_id=self.image_id,
                        operation=UPDATE,
                        attempts=1,
                        reason=str(exc),
                        option="glance_endpoint",
                    ) from exc

            sent = uploads.save(
                pipeline,
                glance,
                self.image_id,
                ref,
                parent,
                self.project_id,
                properties=fields,
                clear=uploads.not_inherited(self.conf),
                before=nova_update,
            )
        if sent is None:
            return {**self.image_meta, "id": self.image_id, "status": "queued"}
        LOG.info(
            "Image %s: snapshot %s uploaded, %d KiB%s",
            self.image_id,
            self.path,
            sent.size >> 10,
            f", a delta against image {sent.parent_image}" if sent.parent_image else "",
        )
        try:
            return self.service.show(self.context, self.image_id)
        except Exception:  # noqa: BLE001  the upload is done; the record is for callers only
            LOG.debug("Image %s: record not read back", self.image_id, exc_info=True)
            return self.record

    def _parent(self, glance: GlanceClient, store: BaseCopyStore) -> BaseCopy | None:
        """The raw base copy the saved instance's disk derives from, if this host has it."""
        record = glance.get_image(self.image_id)
        base = None
        instance_uuid = record.get("instance_uuid")
        if instance_uuid and "/" not in str(instance_uuid):
            instances = nova_glance.CONF.instances_path
            base = store.parent_base(os.path.join(instances, str(instance_uuid), "disk"))
        if base is None and record.get("base_image_ref"):
            base = store.lookup(str(record["base_image_ref"]))
        if base is None:
            return None
        if not holds_raw(base):
            LOG.info(
                "Image %s: the parent image %s is %s here, not raw; uploaded whole",
                self.image_id,
                base.image_id,
                base.record.get("disk_format"),
            )
            return None
        return base

    @contextlib.contextmanager
    def _disk(
        self, store: BaseCopyStore, parent: BaseCopy | None, disk_format: str
    ) -> Iterator[tuple[str, str, BaseCopy | None]]:
        """The disk to upload: Nova's file, or for a delta its raw form in the store.

        Yields (path, its format, the parent still usable). The raw form is a download
        slot of the store (removed afterwards, or at a start after a crash); whatever the
        upload keeps of it is a hard link.
        """
        ref, fmt, slot = self.path, disk_format, None
        if parent is not None and disk_format != "raw":
            try:
                slot = store.begin_download(self.image_id, _virtual_size(self.path))
                differential.convert(self.path, disk_format, slot.path, "raw")
                ref, fmt = slot.path, "raw"
            except (exception.TorrentImagesError, OSError, ValueError) as exc:
                LOG.warning(
                    "Image %s: no raw form of %s for a delta (%s); uploaded whole",
                    self.image_id,
                    self.path,
                    exc,
                )
                parent = None
        try:
            yield ref, fmt, parent
        finally:
            if slot is not None:
                verify.discard(slot.path)


def _virtual_size(path: str) -> int:
    """The virtual size of a qcow2 image from its header (oslo.utils' format inspector)."""
    from oslo_utils.imageutils import format_inspector

    size = format_inspector.QcowInspector.from_file(path).virtual_size
    if size <= 0:
        raise ValueError(f"{path} has no virtual size")
    return size


def save(
    hook: Any,
    service: nova_glance.GlanceImageServiceV2,
    original: Callable[..., Any],
    context: Any,
    image_id: str,
    image_meta: dict[str, Any],
    data: Any,
    purge_props: bool,
) -> Any:
    """Nova's ``update`` with a snapshot file, through this library (see the module)."""
    path = _file_of(data)
    if path is None or not hook.glance_configured():
        record = original(service, context, image_id, image_meta, data, purge_props)
        if record is not None and path is not None:
            keep_snapshot(hook, context, image_id, data, record)
        return record
    upload = SnapshotUpload(
        hook, service, original, context, image_id, image_meta, path, purge_props
    )
    try:
        return upload.run(hook.glance(context))
    except exception.ImageNotFound as exc:
        raise nova_exception.ImageNotFound(image_id=image_id) from exc
    except exception.GlanceForbidden as exc:
        raise nova_exception.ImageNotAuthorized(image_id=image_id) from exc
    except exception.GlanceUnavailable as exc:
        # Glance is down and no copy could be kept for a later upload.
        LOG.error("Image %s: %s", image_id, exc)
        raise nova_exception.GlanceConnectionFailed(server="glance", reason=str(exc)) from exc
    except exception.GlanceError as exc:
        LOG.error("Image %s: %s", image_id, exc)
        raise nova_exception.CouldNotUploadImage(image_id=image_id) from exc
    except Exception:  # noqa: BLE001  a failure of ours must not fail the snapshot
        LOG.warning(
            "Image %s: this library's snapshot upload failed; Nova uploads it itself",
            image_id,
            exc_info=True,
        )
        record = original(service, context, image_id, image_meta, data, purge_props)
        if record is not None:
            keep_snapshot(hook, context, image_id, data, record)
        return record


def _wrap(original: Callable[..., Any], active: Callable[[], Any]) -> Callable[..., Any]:
    """``active()`` gives the installed download hook (download.py), or None."""

    @functools.wraps(original)
    def update(
        self: nova_glance.GlanceImageServiceV2,
        context: Any,
        image_id: str,
        image_meta: dict[str, Any],
        data: Any = None,
        purge_props: bool = True,
    ) -> Any:
        hook = active()
        if hook is None or data is None:
            return original(self, context, image_id, image_meta, data, purge_props)
        return save(hook, self, original, context, image_id, image_meta, data, purge_props)

    setattr(update, _ORIGINAL_ATTR, original)
    return update


def install(active: Callable[[], Any]) -> None:
    """Wrap Nova's snapshot upload (idempotent); done by :func:`.download.install`.

    ``active()`` gives the download hook in force (its pipeline keeps the snapshots), so
    that this module need not import the download side.
    """
    if not hasattr(_TARGET.update, _ORIGINAL_ATTR):
        _TARGET.update = _wrap(_TARGET.update, active)


def uninstall() -> None:
    original = getattr(_TARGET.update, _ORIGINAL_ATTR, None)
    if original is not None:
        _TARGET.update = original
