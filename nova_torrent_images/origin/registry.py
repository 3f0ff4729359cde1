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

"""The origin's registry of published images: the sidecar schema and the on-disk layout.

The registry (``[torrent_images] origin_state_dir``) is the origin's only state::

    images/<image id>/image.torrent   the .torrent (bencoded, with the v2 piece layers)
    images/<image id>/meta.json       sidecar (:class:`PublishedImage`): hashes, size,
                                      Glance hash, magnet, ...
    images/<image id>/<image id>      the image data (or <origin_data_dir>/<image id>)
    images/.staging-*                 an unfinished publish (ignored, removed later)
    locks/                            oslo.concurrency file locks (one per image id)

An entry appears by renaming a complete staging directory (:class:`Staging`) into place,
with the sidecar written last, so a crash never leaves a half entry the seeder could pick
up. Publishing (:mod:`.publisher`), the seeder and the command line share it through
:class:`Registry`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from oslo_concurrency import lockutils
from oslo_log import log as logging

from nova_torrent_images import exception
from nova_torrent_images.common.utils import atomic_write, fsync_dir
from nova_torrent_images.glance.image import ImageInfo
from nova_torrent_images.glance.magnet import parse_magnet
from nova_torrent_images.origin.tracker import tracker_hashes

LOG = logging.getLogger(__name__)

SIDECAR = "meta.json"
TORRENT_FILE = "image.torrent"
SIDECAR_VERSION = 1
_IMAGE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,254}$")


def validate_image_id(image_id: str) -> str:
    """Return ``image_id`` if it is safe as a file name (Glance ids are UUIDs)."""
    if not isinstance(image_id, str) or not _IMAGE_ID.match(image_id):
        raise exception.NotPublishable(
            image_id=image_id, reason="it is not a valid image id (letters, digits, - and _)"
        )
    return image_id


@dataclass
class PublishedImage:
    """A registry entry: what was published and where its files are (the sidecar schema)."""

    image_id: str
    size: int
    hash_algo: str
    hash_value: str
    info_hash_v1: str | None
    info_hash_v2: str | None
    piece_length: int
    num_pieces: int
    magnet: str = ""
    name: str | None = None
    checksum: str | None = None
    glance_updated_at: str | None = None
    published_at: str = ""
    # Whether publish set is_torrentable=true (unpublish then removes it again).
    set_torrentable: bool = False
    dropped_from_magnet: list[str] = field(default_factory=list)
    # Where the files are; not stored in the sidecar.
    directory: str = field(default="", compare=False, repr=False)
    data_path: str = field(default="", compare=False, repr=False)

    _STORED = (
        "image_id",
        "size",
        "hash_algo",
        "hash_value",
        "info_hash_v1",
        "info_hash_v2",
        "piece_length",
        "num_pieces",
        "magnet",
        "name",
        "checksum",
        "glance_updated_at",
        "published_at",
        "set_torrentable",
        "dropped_from_magnet",
    )

    @property
    def torrent_path(self) -> str:
        return os.path.join(self.directory, TORRENT_FILE)

    @property
    def torrent_format(self) -> str:
        """``v1``, ``v2`` or ``hybrid``: which info-hashes the published torrent has."""
        if self.info_hash_v1 and self.info_hash_v2:
            return "hybrid"
        return "v2" if self.info_hash_v2 else "v1"

    @property
    def tracker_hashes(self) -> list[str]:
        return tracker_hashes(self.info_hash_v1, self.info_hash_v2)

    def to_json(self) -> str:
        data = {name: getattr(self, name) for name in self._STORED}
        data["version"] = SIDECAR_VERSION
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, directory: str, data_path: str) -> PublishedImage:
        data = json.loads(text)
        if data.get("version") != SIDECAR_VERSION:
            raise ValueError(f"unknown sidecar version {data.get('version')!r}")
        kwargs = {name: data[name] for name in cls._STORED if name in data}
        return cls(**kwargs, directory=directory, data_path=data_path)

    def image_info(self) -> ImageInfo:
        """What verification needs, from the sidecar (the Glance record at publish time)."""
        return ImageInfo(
            id=self.image_id,
            name=self.name,
            status="active",
            size=self.size,
            disk_format="raw",
            container_format=None,
            hash_algo=self.hash_algo,
            hash_value=self.hash_value,
            is_torrentable=True,
            magnet=None,
            magnet_uri=None,
        )

    def has_data(self) -> bool:
        try:
            return os.path.getsize(self.data_path) == self.size
        except OSError:
            return False

    def matches(self, image: ImageInfo) -> bool:
        """Whether Glance's record still describes the bytes that were published."""
        return (
            image.size == self.size
            and image.hash_algo == self.hash_algo
            and image.hash_value == self.hash_value
        )

    def named_by(self, magnet_uri: str | None) -> bool:
        """Whether ``magnet_uri`` names this torrent (by either info-hash)."""
        if not magnet_uri:
            return False
        try:
            magnet = parse_magnet(magnet_uri)
        except ValueError:
            return False
        return bool(
            (magnet.info_hash_v2 and magnet.info_hash_v2 == self.info_hash_v2)
            or (magnet.info_hash_v1 and magnet.info_hash_v1 == self.info_hash_v1)
        )


@dataclass
class Staging:
    """An unfinished registry entry, invisible to the seeder until committed."""

    image_id: str
    directory: str
    data_path: str

    @property
    def torrent_path(self) -> str:
        return os.path.join(self.directory, TORRENT_FILE)


class Registry:
    """The origin's on-disk registry of published images (see the module docstring)."""

    def __init__(self, state_dir: str, data_dir: str | None = None) -> None:
        self.state_dir = os.path.abspath(state_dir)
        self.images_dir = os.path.join(self.state_dir, "images")
        self.lock_dir = os.path.join(self.state_dir, "locks")
        self.data_dir = os.path.abspath(data_dir) if data_dir else None

    def ensure(self) -> Registry:
        dirs = [self.images_dir, self.lock_dir] + ([self.data_dir] if self.data_dir else [])
        try:
            for d in dirs:
                os.makedirs(d, exist_ok=True)
        except OSError as exc:
            raise exception.RegistryError(path=self.state_dir, reason=str(exc)) from exc
        return self

    # -- paths -------------------------------------------------------------------------
    def entry_dir(self, image_id: str) -> str:
        return os.path.join(self.images_dir, validate_image_id(image_id))

    def data_path(self, image_id: str) -> str:
        base = self.data_dir or self.entry_dir(image_id)
        return os.path.join(base, validate_image_id(image_id))

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """A lock shared by every process using this registry (publish, seeder, CLI)."""
        self.ensure()
        with lockutils.lock(f"nti-origin-{name}", external=True, lock_path=self.lock_dir):
            yield

    # -- reading -----------------------------------------------------------------------
    def get(self, image_id: str) -> PublishedImage | None:
        directory = self.entry_dir(image_id)
        path = os.path.join(directory, SIDECAR)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise exception.RegistryError(path=path, reason=str(exc)) from exc
        try:
            return PublishedImage.from_json(text, directory, self.data_path(image_id))
        except (ValueError, TypeError, KeyError) as exc:
            LOG.error("Registry entry %s is unreadable (%s); treating it as unpublished", path, exc)
            return None

    def list(self) -> list[PublishedImage]:
        entries = []
        try:
            names = sorted(os.listdir(self.images_dir))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise exception.RegistryError(path=self.images_dir, reason=str(exc)) from exc
        for name in names:
            if name.startswith(".") or not _IMAGE_ID.match(name):
                continue
            entry = self.get(name)
            if entry is not None:
                entries.append(entry)
        return entries

    def signature(self) -> tuple:
        """Changes whenever an entry appears, goes or has its sidecar rewritten (cheap)."""
        try:
            with os.scandir(self.images_dir) as it:
                names = sorted(e.name for e in it if not e.name.startswith("."))
        except FileNotFoundError:
            return ()
        sig = []
        for name in names:
            try:
                sig.append(
                    (name, os.stat(os.path.join(self.images_dir, name, SIDECAR)).st_mtime_ns)
                )
            except OSError:
                sig.append((name, None))
        return tuple(sig)

    def read_torrent(self, entry: PublishedImage) -> bytes:
        try:
            with open(entry.torrent_path, "rb") as f:
                return f.read()
        except OSError as exc:
            raise exception.RegistryError(path=entry.torrent_path, reason=str(exc)) from exc

    # -- writing -----------------------------------------------------------------------
    def stage(self, image_id: str) -> Staging:
        self.ensure()
        directory = tempfile.mkdtemp(prefix=f".staging-{image_id}-", dir=self.images_dir)
        os.chmod(directory, 0o755)
        if self.data_dir:
            data_path = os.path.join(self.data_dir, f".staging-{os.path.basename(directory)}")
        else:
            data_path = os.path.join(directory, image_id)
        return Staging(image_id, directory, data_path)

    def commit(self, staging: Staging, entry: PublishedImage) -> PublishedImage:
        """Move a complete staging entry into place (replacing an older entry)."""
        target = self.entry_dir(staging.image_id)
        data_target = self.data_path(staging.image_id)
        try:
            atomic_write(os.path.join(staging.directory, SIDECAR), entry.to_json())
            if self.data_dir:
                os.replace(staging.data_path, data_target)
            if os.path.exists(target):
                self._discard_dir(target)
            os.rename(staging.directory, target)
        except OSError as exc:
            raise exception.RegistryError(path=target, reason=str(exc)) from exc
        fsync_dir(self.images_dir)
        return dataclasses.replace(entry, directory=target, data_path=data_target)

    def abort(self, staging: Staging) -> None:
        self._discard_dir(staging.directory)
        if self.data_dir:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staging.data_path)

    def save(self, entry: PublishedImage) -> None:
        """Rewrite an entry's sidecar (its magnet or flags changed)."""
        path = os.path.join(entry.directory, SIDECAR)
        try:
            if not os.path.isdir(entry.directory):  # removed meanwhile: never resurrect it
                raise FileNotFoundError(f"the entry {entry.directory} no longer exists")
            atomic_write(path, entry.to_json())
        except OSError as exc:
            raise exception.RegistryError(path=path, reason=str(exc)) from exc

    def remove(self, image_id: str) -> PublishedImage | None:
        entry = self.get(image_id)
        directory = self.entry_dir(image_id)
        if os.path.exists(directory):
            self._discard_dir(directory)
        if self.data_dir:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.data_path(image_id))
        return entry

    def cleanup_staging(self, older_than: float = 3600.0) -> None:
        """Remove leftovers of publishes that died (staging older than ``older_than`` s)."""
        now = time.time()
        for base in filter(None, (self.images_dir, self.data_dir)):
            try:
                names = os.listdir(base)
            except OSError:
                continue
            for name in names:
                if not name.startswith((".staging-", ".trash-")):
                    continue
                path = os.path.join(base, name)
                try:
                    if now - os.lstat(path).st_mtime < older_than:
                        continue
                except OSError:
                    continue
                LOG.info("Removing the leftover of an interrupted publish: %s", path)
                if os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        os.unlink(path)

    def _discard_dir(self, directory: str) -> None:
        # Rename first: the entry vanishes at once even if removing big data takes time.
        trash = os.path.join(
            self.images_dir, f".trash-{os.path.basename(directory)}-{os.getpid()}-{time.time_ns()}"
        )
        try:
            os.rename(directory, trash)
        except FileNotFoundError:
            return
        except OSError as exc:
            LOG.warning("Cannot move %s aside (%s); removing it in place", directory, exc)
            trash = directory
        shutil.rmtree(trash, ignore_errors=True)
