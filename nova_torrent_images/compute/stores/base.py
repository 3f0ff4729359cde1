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

"""Where images land and base copies live: the one interface every store driver implements.

A store keeps *base copies*: verified, read-only images tagged with what they are (image
id, info-hash, size, hash, created and last-used times, the Glance record they were
verified against). The store's own metadata is the only registry (VDI ``other_config`` on
XenServer, a sidecar file on a filesystem), so nothing can fall out of sync after a crash.
A download goes into a *slot*, which becomes a base copy only through
:meth:`BaseCopyStore.commit` after verification; a failed slot is aborted and leaves
nothing behind.

As in glance_store, each driver declares what it can do in :class:`StoreCapabilities`, and
callers ask the declaration instead of probing for methods. Drivers are loaded by name from
the ``nova_torrent_images.stores`` entry point namespace
(:mod:`nova_torrent_images.compute.stores`).
"""

from __future__ import annotations

import abc
import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from nova_torrent_images import exception
from nova_torrent_images.common import files
from nova_torrent_images.glance.image import ImageInfo


@dataclass(frozen=True)
class StoreCapabilities:
    """What a store driver can do; the pipeline and the handlers act on this, nothing else."""

    #: A slot is a file or device that exists before the download (a VDI's block device)
    #: and is written in place; otherwise the writer creates the slot's file.
    writes_in_place: bool = False
    #: Disk formats the store takes as they are (a VDI takes only raw); None: any.
    disk_formats: tuple[str, ...] | None = None
    #: Base copies can be seeded from a read-only view (:meth:`BaseCopyStore.seed_path`).
    seeds: bool = False
    #: Instances get copy-on-write clones (:meth:`BaseCopyStore.clone`).
    clones: bool = False
    #: Any disk of the store can be attached read-only, e.g. to upload a snapshot
    #: (:meth:`BaseCopyStore.attached`).
    attach_for_upload: bool = False
    #: Base copies stay and are found again (a registry); an output file is not kept.
    keeps_base_copies: bool = True
    #: A disk of the store (a snapshot just uploaded) can become a base copy in place of a
    #: download, and be kept read-only while its upload waits for Glance
    #: (:meth:`BaseCopyStore.adopt_disk`, :meth:`BaseCopyStore.keep_for_upload`).
    adopts_disks: bool = False
    #: A slot can start as a copy-on-write clone of a base copy, so that rebuilding a
    #: differential image writes only what differs (:meth:`BaseCopyStore.begin_from`).
    clone_slots: bool = False


@dataclass
class BaseCopy:
    """A verified, read-only image in a store."""

    image_id: str
    size: int
    hash_algo: str
    hash_value: str
    info_hash_v1: str | None
    info_hash_v2: str | None
    created_at: float
    last_used: float
    #: The store's stable name of the base copy, the one its operators see: a VDI uuid
    #: (XenAPI), the data file's path (filesystem, output file).
    ref: str
    in_use: bool = False  # instances still depend on it (clones, open files)
    #: The Glance record it was verified against (see :func:`cached_record`), and the
    #: projects Glance showed the image to: what a boot may rely on while Glance is down.
    record: dict[str, Any] = field(default_factory=dict)
    projects: tuple[str, ...] = ()
    source: str | None = None  # what delivered it: torrent, location, zone-cache, glance

    @property
    def info_hash(self) -> str | None:
        return self.info_hash_v2 or self.info_hash_v1

    def matches(self, image: ImageInfo) -> bool:
        """Whether this copy holds the bytes Glance's record describes (size and hash)."""
        return (self.hash_algo, self.hash_value, self.size) == (
            image.hash_algo,
            image.hash_value,
            image.size,
        )


@dataclass
class Slot:
    """Space for one download: a path libtorrent (or the Glance stream) writes into.

    Drivers subclass it for their own handles (a VDI and its VBD); callers only read these
    fields.
    """

    image_id: str
    size: int
    path: str
    #: Write in place (the path exists: a device); else the writer creates the file.
    preallocated: bool = False


@dataclass(frozen=True)
class Capacity:
    total: int
    free: int
    ours: int  # bytes held by base copies of this library


# The parts of a Glance record kept with a base copy. Enough to boot while Glance is down
# and to check access then (owner, visibility); never the locations or other secrets.
RECORD_FIELDS = (
    "id",
    "name",
    "status",
    "visibility",
    "owner",
    "size",
    "disk_format",
    "container_format",
    "os_hash_algo",
    "os_hash_value",
    "checksum",
    "min_disk",
    "min_ram",
)


def cached_record(image: ImageInfo, raw: dict[str, Any] | None = None) -> dict[str, Any]:
    """The part of the image's Glance record a base copy keeps."""
    source = raw if raw is not None else image.record
    record = {k: source[k] for k in RECORD_FIELDS if source.get(k) is not None}
    record.update(image.properties)
    return record


@dataclass
class CommitInfo:
    """What the verified download was, recorded on the base copy."""

    image: ImageInfo
    created_at: float = field(default_factory=time.time)
    projects: tuple[str, ...] = ()
    source: str | None = None  # set by the pipeline once a source delivered

    @property
    def info_hash_v1(self) -> str | None:
        return self.image.magnet.info_hash_v1 if self.image.magnet else None

    @property
    def info_hash_v2(self) -> str | None:
        return self.image.magnet.info_hash_v2 if self.image.magnet else None

    @property
    def record(self) -> dict[str, Any]:
        return cached_record(self.image)


class BaseCopyStore(abc.ABC):
    """The store operations (doc/source/architecture.rst); optional ones follow capabilities."""

    capabilities = StoreCapabilities()

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """Human-readable name for logs and errors (an SR name and uuid, a directory)."""

    @abc.abstractmethod
    def lookup(self, image_id: str) -> BaseCopy | None:
        """The base copy of ``image_id``, if this store has one."""

    @abc.abstractmethod
    def begin_download(self, image_id: str, size: int) -> Slot:
        """Make room for a download; raise ``StoreFull`` when there is none."""

    @abc.abstractmethod
    def commit(self, slot: Slot, info: CommitInfo) -> BaseCopy:
        """Turn a verified slot into a read-only, tagged base copy."""

    @abc.abstractmethod
    def abort(self, slot: Slot) -> None:
        """Remove everything ``begin_download`` created; never raises for missing parts."""

    @abc.abstractmethod
    def remove_stale_slots(self, try_lock: Callable[[str], Any] | None = None) -> int:
        """Remove what crashed processes of this host left (slots, attachments, half clones).

        Resources of live processes are never touched: each carries its owner.
        ``try_lock(image_id)``, a context manager yielding whether it holds the image's
        lock, guards what only the image lock tells apart from work in progress.
        """

    @abc.abstractmethod
    def list(self) -> list[BaseCopy]:
        """Every base copy of this store."""

    @abc.abstractmethod
    def destroy(self, base: BaseCopy) -> None:
        """Delete a base copy (callers check ``in_use`` first)."""

    @abc.abstractmethod
    def touch(self, base: BaseCopy) -> None:
        """Record a use now (for least-recently-used eviction)."""

    @abc.abstractmethod
    def capacity(self) -> Capacity:
        """Space of the store, and how much of it base copies take."""

    def add_project(self, base: BaseCopy, project_id: str) -> None:  # noqa: B027
        """Remember that Glance showed the image to ``project_id`` (for boots offline).

        A store without a registry has nothing to remember it in.
        """

    def refresh_record(
        self, base: BaseCopy, record: dict[str, Any], projects: tuple[str, ...]
    ) -> None:
        """Keep ``record`` (:func:`cached_record` of what Glance just returned) and
        ``projects`` with ``base`` in place of what it kept, for boots while Glance is down.

        ``projects`` replaces the remembered projects (it may be narrower: see
        :func:`nova_torrent_images.compute.offline.refreshed_projects`). Called under the
        image's lock. A failure raises, and must never leave a kept state wider than the
        old one or the new one; the caller notes it, and offline boots then require both
        (:func:`nova_torrent_images.compute.offline.refresh_record`). ``base`` is updated.
        A store without a registry keeps nothing; one that keeps base copies and has no
        way to refresh them fails (fail closed, never silently stale).
        """
        if self.capabilities.keeps_base_copies:
            raise self._unsupported("refreshing the Glance record kept with a base copy")

    # -- optional, as declared in ``capabilities`` -------------------------------------
    @contextlib.contextmanager
    def seed_path(self, base: BaseCopy) -> Iterator[str]:
        """A read-only path of the base copy for the duration of the context."""
        raise self._unsupported("seeding")
        yield ""  # pragma: no cover

    def clone(self, base: BaseCopy, label: str) -> str:
        """A writable, copy-on-write instance disk of ``base``; returns its reference."""
        raise self._unsupported("instance clones")

    @contextlib.contextmanager
    def attached(self, ref: str, mode: str = "RO") -> Iterator[str]:
        """Attach the disk ``ref`` of this store for the duration of the context."""
        raise self._unsupported("attaching disks")
        yield ""  # pragma: no cover

    def adopt_disk(self, ref: str, info: CommitInfo) -> BaseCopy:
        """A read-only base copy of the disk ``ref`` (its bytes are ``info.image``'s).

        The caller verified the bytes (hashed while uploading them, checked against the
        Glance record read back); the disk itself stays as it was.
        """
        raise self._unsupported("adopting disks")

    def keep_for_upload(self, ref: str, image_id: str, project_id: str | None) -> str:
        """A read-only copy of the disk ``ref`` for an upload queued while Glance is down.

        Tagged with the image id and project, it survives restarts; returns its reference.
        """
        raise self._unsupported("keeping disks for queued uploads")

    def drop_kept(self, ref: str) -> None:
        """Delete a copy made by :meth:`keep_for_upload`; missing is not an error."""
        raise self._unsupported("keeping disks for queued uploads")

    def disk_size(self, ref: str) -> int:
        """The size in bytes of the disk ``ref`` (a queued upload's kept copy)."""
        with self.attached(ref, "RO") as path:
            return files.data_size(path)

    def begin_from(self, base: BaseCopy, image_id: str, size: int) -> Slot:
        """Like :meth:`begin_download`, but the slot already holds ``base``'s bytes."""
        raise self._unsupported("slots cloned from a base copy")

    def parent_base(self, ref: str) -> BaseCopy | None:
        """The base copy the disk ``ref`` is a clone of, if known (differential uploads)."""
        return None

    def kept_for_upload(self) -> dict[str, str]:
        """The copies :meth:`keep_for_upload` made and nobody dropped: ``{ref: image_id}``."""
        return {}

    def _unsupported(self, what: str) -> exception.StoreError:
        return exception.StoreError(reason=f"{self.name} does not support {what}")
