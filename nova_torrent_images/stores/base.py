"""Where images land and base copies live: the interface every store implements.

A store keeps *base copies*: verified, read-only images tagged with what they are (image
id, info-hash, size, hash, created and last-used times). The store's own metadata is the
only registry (VDI ``other_config`` on XenServer, a sidecar file on a filesystem), so
nothing can fall out of sync after a crash. A download goes into a *slot*, which becomes a
base copy only through :meth:`BaseCopyStore.commit` after verification; a failed slot is
aborted and leaves nothing behind.
"""

from __future__ import annotations

import abc
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from nova_torrent_images.image import ImageInfo


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
    ref: str  # the store's own handle: a VDI uuid, a file path
    in_use: bool = False  # instances still depend on it (clones, open files)

    @property
    def info_hash(self) -> str | None:
        return self.info_hash_v2 or self.info_hash_v1


@dataclass
class Slot:
    """Space for one download; a path libtorrent (or the Glance stream) writes into."""

    image_id: str
    size: int
    path: str
    handle: dict[str, Any] = field(default_factory=dict)  # store-specific refs


@dataclass(frozen=True)
class Capacity:
    total: int
    free: int
    ours: int  # bytes held by base copies of this library


@dataclass
class CommitInfo:
    """What the verified download was, recorded on the base copy."""

    image: ImageInfo
    created_at: float = field(default_factory=time.time)

    @property
    def info_hash_v1(self) -> str | None:
        return self.image.magnet.info_hash_v1 if self.image.magnet else None

    @property
    def info_hash_v2(self) -> str | None:
        return self.image.magnet.info_hash_v2 if self.image.magnet else None


class BaseCopyStore(abc.ABC):
    """The operations of DESIGN section 4."""

    #: what this store can take as it is, e.g. ("raw",) for a XenServer VDI
    disk_formats: tuple[str, ...] | None = None

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
    @contextlib.contextmanager
    def seed_path(self, base: BaseCopy) -> Iterator[str]:
        """A read-only path of the base copy for the duration of the context."""

    @abc.abstractmethod
    def clone(self, base: BaseCopy, label: str) -> str:
        """A writable, copy-on-write instance disk of ``base``; returns its reference."""

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
