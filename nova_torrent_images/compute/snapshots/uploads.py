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

"""Snapshot uploads: kept as base copies on the saving host, queued while Glance is down.

:func:`upload_disk` streams a disk of the store to Glance, hashing it (sha512, Glance's
default ``os_hash_algo``) on the way; :func:`keep` reads the image record back and,
when Glance's size and hash are the bytes sent, makes the disk a base copy through the
pipeline, so that a restore on this host reads nothing from Glance.

When Glance cannot take the upload (:class:`~exception.GlanceUnavailable`, after the Glance
client's own retries), :meth:`UploadQueue.enqueue` keeps a read-only copy of the disk in the
store (tagged ``queued-upload`` with the image id and project) and writes
``<state_dir>/uploads/<image_id>.json``. The long-running process retries due entries with
exponential backoff (:meth:`UploadQueue.run_due`, a task of the pipeline's maintenance);
on success the kept copy becomes the base copy. Both halves survive a restart: the entry is
written atomically, the copy is tagged in the store's own registry.
"""

from __future__ import annotations

import builtins
import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from oslo_log import log as logging

from nova_torrent_images import exception
from nova_torrent_images.common import files, hashing, utils
from nova_torrent_images.compute.snapshots import differential
from nova_torrent_images.compute.stores.base import BaseCopy, BaseCopyStore
from nova_torrent_images.glance import image as image_record
from nova_torrent_images.glance.client import GlanceClient
from nova_torrent_images.glance.image import ImageInfo

LOG = logging.getLogger(__name__)

HASH_ALGO = "sha512"  # Glance's default [DEFAULT] hashing_algorithm
SNAPSHOT = "snapshot"  # the source recorded on a base copy made from a saved disk
RETRY_DELAY = 30.0  # seconds before the first retry of a queued upload
MAX_RETRY_DELAY = 3600.0  # the backoff doubles up to this


def upload_disk(
    store: BaseCopyStore, glance: GlanceClient, image_id: str, ref: str
) -> tuple[int, str]:
    """Upload the disk ``ref`` of ``store`` as image data; returns (size, sha512 hex)."""
    hasher = hashlib.new(HASH_ALGO)
    with store.attached(ref, "RO") as path:
        size = files.data_size(path)
        with open(path, "rb") as data:
            reader = hashing.HashingReader(data, hasher, size)
            glance.upload(image_id, reader, size)
    if reader.read_bytes != size:
        raise exception.StoreError(
            reason=f"image {image_id}: read {reader.read_bytes} of {size} bytes of disk {ref}"
        )
    return size, hasher.hexdigest()


def uploaded_image(glance: GlanceClient, image_id: str, size: int, digest: str) -> ImageInfo | None:
    """The image record read back, if Glance holds exactly the bytes sent; else None."""
    image = glance.image_info(image_id)
    if (image.size, image.hash_algo, image.hash_value) != (size, HASH_ALGO, digest):
        LOG.warning(
            "Image %s: Glance records size %s and %s hash %s, not the %d bytes uploaded "
            "(sha512 %s); the snapshot is not kept as a base copy",
            image_id,
            image.size,
            image.hash_algo,
            image.hash_value,
            size,
            digest,
        )
        return None
    return image


def not_inherited(conf: Any) -> tuple[str, ...]:
    """Properties a snapshot must not carry over from the image its instance booted.

    Nova copies the booted image's properties into the snapshot's record (its
    ``image_*`` system metadata): the torrent's would name another image's magnet, a
    chain's would make a whole upload pass for a delta. They are removed before the data
    goes; a delta sets its own again.
    """
    opts = conf.torrent_images
    return (
        opts.torrentable_property,
        opts.magnet_property,
        opts.bound_hash_property,
        image_record.PARENT_PROPERTY,
        image_record.WHOLE_SIZE_PROPERTY,
        image_record.WHOLE_HASH_PROPERTY,
    )


@dataclasses.dataclass(frozen=True)
class Sent:
    """What went to Glance: its size and sha512, and the parent image of a delta."""

    size: int
    digest: str
    parent_image: str | None = None


def send(
    store: BaseCopyStore,
    glance: GlanceClient,
    image_id: str,
    ref: str,
    parent: BaseCopy | None,
    scratch_dir: str,
    *,
    properties: dict[str, Any] | None = None,
    clear: Iterable[str] = (),
) -> Sent:
    """Upload disk ``ref``: whole, or with a ``parent`` base copy as a delta against it.

    First ``properties`` are set (the record a Glance outage kept from being written) and
    the properties named in ``clear`` removed (:func:`not_inherited`).
    """
    if properties:
        glance.set_properties(image_id, **properties)
    clear = list(clear)
    if clear:
        glance.remove_properties(image_id, clear)
    if parent is not None:
        sent = differential.upload_delta(store, glance, image_id, ref, parent, scratch_dir)
        if sent is not None:
            return Sent(sent[2], sent[3], parent.image_id)
    return Sent(*upload_disk(store, glance, image_id, ref))


def kept_image(glance: GlanceClient, image_id: str, sent: Sent) -> ImageInfo | None:
    """The image to keep the uploaded disk as (the whole view of a delta), if verified."""
    image = uploaded_image(glance, image_id, sent.size, sent.digest)
    if image is not None and sent.parent_image:
        image = differential.whole_view(image)
    return image


def keep(
    pipeline: Any, glance: GlanceClient, image_id: str, sent: Sent, ref: str, project_id: str | None
) -> None:
    """Make the uploaded disk ``ref`` the image's base copy when Glance holds its bytes.

    Never raises for a failure of its own: the upload is done, only the local copy is
    missing then (a restore downloads the image).
    """
    try:
        image = kept_image(glance, image_id, sent)
        if image is not None:
            pipeline.adopt_disk(image, ref, project_id)
    except exception.TorrentImagesError as exc:
        LOG.warning("Image %s: uploaded, but not kept as a base copy: %s", image_id, exc)


def save(
    pipeline: Any,
    glance: GlanceClient,
    image_id: str,
    ref: str,
    parent: BaseCopy | None,
    project_id: str | None,
    *,
    properties: dict[str, Any] | None = None,
    clear: Iterable[str] = (),
    before: Callable[[], None] | None = None,
) -> Sent | None:
    """A snapshot's upload, as both virt drivers make it (doc/source/snapshots.rst).

    ``before()`` runs first (the libvirt driver's own record update); then disk ``ref`` of
    the pipeline's store is sent (:func:`send`: whole, or as a delta against ``parent``),
    and kept as the image's base copy when Glance holds exactly its bytes. When Glance
    cannot take it (:class:`~exception.GlanceUnavailable`, also from ``before``) a
    read-only copy is kept and the upload queued, with ``clear`` and ``properties`` (what
    ``before`` writes) for the retry. Returns what was sent, or None when queued.
    """
    store = pipeline.store
    clear = tuple(clear)
    try:
        if before is not None:
            before()
        sent = send(
            store,
            glance,
            image_id,
            ref,
            parent,
            os.path.join(pipeline.state_dir, "deltas"),
            clear=clear,
        )
    except exception.GlanceUnavailable as exc:
        if not store.capabilities.adopts_disks:
            raise
        pipeline.uploads.enqueue(
            store,
            image_id,
            ref,
            project_id,
            exc,
            parent.ref if parent else None,
            properties=properties,
            clear=clear,
        )
        return None
    if store.capabilities.adopts_disks:
        keep(pipeline, glance, image_id, sent, ref, project_id)
    return sent


def find_base(store: BaseCopyStore, ref: str | None) -> BaseCopy | None:
    return next((b for b in store.list() if b.ref == ref), None) if ref else None


@dataclasses.dataclass
class QueuedUpload:
    """One upload waiting for Glance: ``<state_dir>/uploads/<image_id>.json``."""

    image_id: str
    store: str  # the store's name, for operators
    ref: str  # the read-only copy kept in the store
    project_id: str | None = None
    created_at: float = dataclasses.field(default_factory=time.time)
    attempts: int = 0
    next_attempt: float = 0.0
    last_error: str = ""
    parent_ref: str | None = None  # the parent base copy of a differential upload
    # Set on the record, and removed from it, before the data goes (:func:`send`).
    properties: dict[str, Any] | None = None
    clear: list[str] = dataclasses.field(default_factory=list)
    size: int = 0  # bytes of the kept copy (the queued-upload metric); 0 when unknown

    def delay(self) -> float:
        return min(MAX_RETRY_DELAY, RETRY_DELAY * 2 ** max(0, self.attempts - 1))


class UploadQueue:
    """The queued uploads of one host (one state directory)."""

    def __init__(self, state_dir: str) -> None:
        self.directory = os.path.join(state_dir, "uploads")

    def _path(self, image_id: str) -> str:
        if not image_id or "/" in image_id or image_id.startswith("."):
            raise exception.StoreError(reason=f"not an image id: {image_id!r}")
        return os.path.join(self.directory, f"{image_id}.json")

    def save(self, entry: QueuedUpload) -> None:
        utils.atomic_write(
            self._path(entry.image_id),
            json.dumps(dataclasses.asdict(entry), sort_keys=True, indent=1),
            mode=0o600,
        )

    def get(self, image_id: str) -> QueuedUpload | None:
        try:
            with open(self._path(image_id)) as f:
                data = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            LOG.warning("Ignoring an unreadable queued upload of image %s: %s", image_id, exc)
            return None
        fields = {f.name for f in dataclasses.fields(QueuedUpload)}
        return QueuedUpload(**{k: v for k, v in data.items() if k in fields})

    def list(self) -> list[QueuedUpload]:
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return []
        entries = []
        for name in names:
            if name.endswith(".json") and not name.startswith("."):
                entry = self.get(name[: -len(".json")])
                if entry is not None:
                    entries.append(entry)
        return entries

    def remove(self, image_id: str) -> None:
        try:
            os.unlink(self._path(image_id))
        except FileNotFoundError:
            pass

    # -- the flow --------------------------------------------------------------------
    def enqueue(
        self,
        store: BaseCopyStore,
        image_id: str,
        ref: str,
        project_id: str | None,
        error: Exception,
        parent_ref: str | None = None,
        *,
        properties: dict[str, Any] | None = None,
        clear: Iterable[str] = (),
    ) -> QueuedUpload:
        """Keep a read-only copy of disk ``ref`` and queue its upload as ``image_id``."""
        kept = store.keep_for_upload(ref, image_id, project_id)
        try:
            size = store.disk_size(kept)
        except Exception as exc:  # noqa: BLE001  only the metric lacks it
            LOG.warning("Image %s: size of the kept copy %s unknown: %s", image_id, kept, exc)
            size = 0
        entry = QueuedUpload(
            image_id=image_id,
            store=store.name,
            ref=kept,
            project_id=project_id,
            attempts=1,
            last_error=str(error),
            parent_ref=parent_ref,
            properties=properties or None,
            clear=list(clear),
            size=size,
        )
        entry.next_attempt = time.time() + entry.delay()
        try:
            self.save(entry)
        except BaseException:
            store.drop_kept(kept)
            raise
        LOG.warning(
            "Image %s: Glance cannot take the upload now (%s); the snapshot is kept "
            "read-only as %s in %s and uploaded when Glance is back",
            image_id,
            error,
            kept,
            store.name,
        )
        return entry

    def cancel(self, store: BaseCopyStore, image_id: str) -> QueuedUpload:
        """Forget a queued upload and delete its kept copy (the Glance record stays)."""
        entry = self.get(image_id)
        if entry is None:
            raise exception.StoreError(reason=f"no queued upload of image {image_id}")
        store.drop_kept(entry.ref)
        self.remove(image_id)
        LOG.info("Image %s: queued upload cancelled; its copy %s deleted", image_id, entry.ref)
        return entry

    def run_due(
        self,
        store: BaseCopyStore,
        glance: GlanceClient,
        keep: Any,
        scratch_dir: str,
        *,
        now: float | None = None,
        force: bool = False,
    ) -> builtins.list[str]:
        """Retry the due uploads kept in ``store``; returns the image ids uploaded.

        ``keep(image, ref)`` makes the kept copy a base copy (the pipeline's
        :meth:`~nova_torrent_images.compute.pipeline.ImagePipeline.adopt_disk`).
        """
        done = []
        kept = store.kept_for_upload()
        queued = {e.ref for e in self.list()}
        for ref, image_id in kept.items():
            if ref not in queued and image_id and self.get(image_id) is None:
                # A crash between keeping the copy and writing its entry: queue it now.
                LOG.warning(
                    "Image %s: kept copy %s for a queued upload has no queue entry (a "
                    "crash?); queued again",
                    image_id,
                    ref,
                )
                self.save(QueuedUpload(image_id=image_id, store=store.name, ref=ref))
        for entry in self.list():
            if entry.ref not in kept:
                continue  # another store's, or its copy is gone (see below)
            if not force and entry.next_attempt > (time.time() if now is None else now):
                continue
            if self._retry(store, glance, keep, entry, scratch_dir):
                done.append(entry.image_id)
        return done

    def _retry(
        self,
        store: BaseCopyStore,
        glance: GlanceClient,
        keep: Any,
        e: QueuedUpload,
        scratch_dir: str,
    ) -> bool:
        parent = find_base(store, e.parent_ref)
        try:
            if e.parent_ref and parent is None:
                # The parent base copy went meanwhile: upload whole, undoing what an
                # earlier attempt may have set for a delta.
                glance.set_properties(
                    e.image_id, disk_format="raw", **{image_record.PARENT_PROPERTY: ""}
                )
            sent = send(
                store,
                glance,
                e.image_id,
                e.ref,
                parent,
                scratch_dir,
                properties=e.properties,
                clear=e.clear,
            )
        except exception.ImageNotFound:
            LOG.warning(
                "Image %s: deleted from Glance while its upload was queued; the kept copy "
                "%s is deleted",
                e.image_id,
                e.ref,
            )
            store.drop_kept(e.ref)
            self.remove(e.image_id)
            return False
        except exception.GlanceError as exc:
            e.attempts += 1
            e.last_error = str(exc)
            e.next_attempt = time.time() + e.delay()
            self.save(e)
            LOG.warning(
                "Image %s: queued upload failed again (attempt %d), next in %.0fs: %s",
                e.image_id,
                e.attempts,
                e.delay(),
                exc,
            )
            return False
        LOG.info("Image %s: queued upload done (%d KiB)", e.image_id, sent.size >> 10)
        try:
            image = kept_image(glance, e.image_id, sent)
            if image is not None:
                keep(image, e.ref, e.project_id)
        except exception.TorrentImagesError as exc:
            LOG.warning("Image %s: uploaded, but not kept as a base copy: %s", e.image_id, exc)
        self.remove(e.image_id)
        store.drop_kept(e.ref)
        return True


def local_resume_data(
    store: BaseCopyStore, base: BaseCopy, image: ImageInfo, engine: Any
) -> bytes | None:
    """Resume data to seed ``base`` under ``image``'s magnet, from the local bytes alone.

    The torrent is made here as the origin made it (named by the image id, the magnet's
    v1/v2 kind, the default piece size); only when its info-hashes are the magnet's (the
    trust root is Glance's record) is it used. None otherwise (another piece size). The
    resume data itself comes from the swarm (:func:`~.swarm.recipes.local_resume_data`).
    """
    from nova_torrent_images.swarm import recipes
    from nova_torrent_images.swarm.torrent import make_torrent

    magnet = image.magnet
    if magnet is None:
        return None
    version = (
        "hybrid"
        if magnet.info_hash_v1 and magnet.info_hash_v2
        else ("v2" if magnet.info_hash_v2 else "v1")
    )
    with store.seed_path(base) as path:
        torrent = make_torrent(path, name=image.id, version=version, size=base.size)
        if (torrent.info_hash_v1, torrent.info_hash_v2) != (
            magnet.info_hash_v1,
            magnet.info_hash_v2,
        ):
            LOG.info(
                "Image %s: the torrent made from the kept snapshot is not the published one "
                "(another piece size?); this host does not seed it",
                image.id,
            )
            return None
        return recipes.local_resume_data(
            engine, torrent.data, path, label=f"metadata of snapshot {image.id}"
        )


def seed_published_snapshots(pipeline: Any, glance: GlanceClient) -> list[str]:
    """Seed kept snapshots (source ``snapshot``) that were published since they were saved."""
    started: list[str] = []
    seeds = pipeline.seeds
    if seeds is None:
        return started
    for base in pipeline.store.list():
        if base.source != SNAPSHOT or base.image_id in seeds.seeding():
            continue
        if pipeline.resume.load(base.image_id) is not None:
            continue
        try:
            image = glance.image_info(base.image_id)
        except exception.TorrentImagesError as exc:
            LOG.debug("Image %s: not checked for publication: %s", base.image_id, exc)
            continue
        if not (image.is_torrentable and image.magnet) or not base.matches(image):
            continue
        data = local_resume_data(pipeline.store, base, image, seeds.engine)
        if data is None:
            continue
        pipeline.resume.save(base.image_id, data)
        if seeds.start(base):
            started.append(base.image_id)
    return started
