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

"""Filesystem store: base copies as read-only files with a JSON sidecar each.

Used on libvirt hosts and by the command line tools. Layout of the directory::

    <image_id>.base       the image bytes, mode 0444
    <image_id>.json       the tags (written last: a base without sidecar is unfinished)
    <image_id>.part-<pid>-<n>   a download in progress of process <pid> (removed on
                          abort, or at a start once that process is gone)
    instances/<label>     writable clones (reflinks where the filesystem has them)

Names never look like the 40-hex files Nova's image cache manager deletes from ``_base``.
A base copy is *in use* while another name links to its inode (Nova's cached image is a
hard link of the downloaded bytes) or a clone is recorded for it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

from oslo_config import cfg
from oslo_log import log as logging

from nova_torrent_images import exception, utils
from nova_torrent_images.stores.base import (
    BaseCopy,
    BaseCopyStore,
    Capacity,
    CommitInfo,
    Slot,
    StoreCapabilities,
)

LOG = logging.getLogger(__name__)

PART = ".part-"
# A data file whose sidecar has not followed within this many seconds of its rename was
# left by a crash between the two steps of a commit (they are milliseconds apart).
UNFINISHED_COMMIT_GRACE = 60.0


def reflink_copy(src: str, dst: str, what: str, *, sparse: bool = False) -> None:
    """Copy ``src`` to ``dst``: a reflink where the filesystem can (btrfs, XFS), else bytes.

    ``what`` names the copy in the StoreError raised when ``cp`` fails.
    """
    result = subprocess.run(
        ["cp", "--reflink=auto", *(["--sparse=always"] if sparse else []), "--", src, dst],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise exception.StoreError(reason=f"{what} failed: {result.stderr.strip()}")


def part_owner_pid(name: str) -> int | None:
    """The pid in a ``<name>.part-<pid>-<n>`` download file name, if it has one."""
    _, sep, rest = name.partition(PART)
    pid = rest.partition("-")[0]
    return int(pid) if sep and pid.isdigit() else None


class FilesystemStore(BaseCopyStore):
    """Base copies in one directory."""

    capabilities = StoreCapabilities(seeds=True, clones=True)

    def __init__(self, directory: str) -> None:
        self.directory = os.path.abspath(directory)
        os.makedirs(self.directory, exist_ok=True)

    @classmethod
    def from_conf(cls, conf: cfg.ConfigOpts, **_context: object) -> FilesystemStore:
        return cls(conf.torrent_images.image_cache_dir)

    @property
    def name(self) -> str:
        return f"directory {self.directory}"

    def _path(self, image_id: str, suffix: str) -> str:
        if not image_id or "/" in image_id or image_id.startswith("."):
            raise exception.StoreError(reason=f"{image_id!r} is not a usable image id")
        return os.path.join(self.directory, image_id + suffix)

    # -- registry ----------------------------------------------------------------------
    def _read(self, image_id: str) -> BaseCopy | None:
        sidecar = self._path(image_id, ".json")
        data_path = self._path(image_id, ".base")
        try:
            with open(sidecar) as f:
                tags = json.load(f)
            st = os.stat(data_path)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            LOG.warning("Ignoring unreadable base copy %s in %s: %s", image_id, self.name, exc)
            return None
        clones = [c for c in tags.get("clones", []) if os.path.exists(c)]
        return BaseCopy(
            image_id=tags["image_id"],
            size=int(tags["size"]),
            hash_algo=tags["hash_algo"],
            hash_value=tags["hash_value"],
            info_hash_v1=tags.get("info_hash_v1"),
            info_hash_v2=tags.get("info_hash_v2"),
            created_at=float(tags["created"]),
            last_used=float(tags.get("last_used", tags["created"])),
            ref=data_path,
            in_use=st.st_nlink > 1 or bool(clones),
            record=tags.get("record") or {},
            projects=tuple(tags.get("projects") or ()),
            source=tags.get("source"),
        )

    def _update_tags(self, base: BaseCopy, **changes: object) -> None:
        sidecar = self._path(base.image_id, ".json")
        with open(sidecar) as f:
            tags = json.load(f)
        tags.update(changes)
        utils.atomic_write(sidecar, json.dumps(tags, indent=1))

    def list(self) -> list[BaseCopy]:
        bases = []
        for entry in sorted(os.listdir(self.directory)):
            if entry.endswith(".json"):
                base = self._read(entry[: -len(".json")])
                if base is not None:
                    bases.append(base)
        return bases

    def lookup(self, image_id: str) -> BaseCopy | None:
        return self._read(image_id)

    def remove_stale_slots(self, try_lock: Callable[[str], Any] | None = None) -> int:
        """Remove downloads of processes that died, and commits a crash cut in half.

        A download file carries its process id; one of a live process (another
        nova-compute, a running ``nova-torrent-images fetch``) is never touched.
        """
        removed = 0
        now = time.time()
        for entry in os.listdir(self.directory):
            path = os.path.join(self.directory, entry)
            pid = part_owner_pid(entry) or utils.atomic_tmp_owner(entry)
            if pid is not None:
                stale = not utils.pid_alive(pid)
            elif entry.endswith(".base"):
                try:
                    changed = os.lstat(path).st_ctime
                except FileNotFoundError:
                    continue
                stale = (
                    not os.path.exists(path[: -len(".base")] + ".json")
                    and now - changed > UNFINISHED_COMMIT_GRACE
                )
            else:
                stale = False
            if stale:
                LOG.warning("Removing stale download %s from %s", entry, self.name)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                removed += 1
        return removed

    # -- downloads ---------------------------------------------------------------------
    def begin_download(self, image_id: str, size: int) -> Slot:
        free = self.capacity().free
        if size > free:
            raise exception.StoreFull(
                image_id=image_id, store=self.name, needed=size, available=free
            )
        path = self._path(image_id, f"{PART}{os.getpid()}-{time.monotonic_ns()}")
        return Slot(image_id=image_id, size=size, path=path)

    def commit(self, slot: Slot, info: CommitInfo) -> BaseCopy:
        image = info.image
        data_path = self._path(image.id, ".base")
        with open(slot.path, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(slot.path, 0o444)
        os.replace(slot.path, data_path)
        now = info.created_at
        tags = {
            "image_id": image.id,
            "size": image.size,
            "hash_algo": image.hash_algo,
            "hash_value": image.hash_value,
            "info_hash_v1": info.info_hash_v1,
            "info_hash_v2": info.info_hash_v2,
            "created": now,
            "last_used": now,
            "clones": [],
            "record": info.record,
            "projects": list(info.projects),
            "source": info.source,
        }
        utils.atomic_write(self._path(image.id, ".json"), json.dumps(tags, indent=1))
        LOG.info("Image %s: base copy %s", image.id, data_path)
        return self._read(image.id)

    def adopt_disk(self, ref: str, info: CommitInfo) -> BaseCopy:
        """A base copy of the file ``ref`` (a snapshot Nova just uploaded): a reflink or
        copy into a slot, committed; the file itself is left to its owner."""
        slot = self.begin_download(info.image.id, info.image.size)
        try:
            reflink_copy(ref, slot.path, f"keeping snapshot {ref} of image {info.image.id}")
            return self.commit(slot, info)
        except BaseException:
            self.abort(slot)
            raise

    def abort(self, slot: Slot) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(slot.path)
            LOG.info("Image %s: partial download %s removed", slot.image_id, slot.path)

    # -- base copies -------------------------------------------------------------------
    @contextlib.contextmanager
    def seed_path(self, base: BaseCopy) -> Iterator[str]:
        yield base.ref  # mode 0444: libtorrent only reads it

    def clone(self, base: BaseCopy, label: str) -> str:
        clones_dir = os.path.join(self.directory, "instances")
        os.makedirs(clones_dir, exist_ok=True)
        dest = os.path.join(clones_dir, label)
        if os.path.exists(dest):
            raise exception.StoreError(reason=f"instance disk {dest} already exists")
        reflink_copy(base.ref, dest, f"cloning {base.ref} to {dest}", sparse=True)
        os.chmod(dest, 0o644)
        with open(self._path(base.image_id, ".json")) as f:
            clones = json.load(f).get("clones", [])
        self._update_tags(base, clones=[*clones, dest])
        self.touch(base)
        return dest

    def touch(self, base: BaseCopy) -> None:
        base.last_used = time.time()
        self._update_tags(base, last_used=base.last_used)

    def add_project(self, base: BaseCopy, project_id: str) -> None:
        if project_id in base.projects:
            return
        with open(self._path(base.image_id, ".json")) as f:
            known = json.load(f).get("projects") or []
        base.projects = tuple(dict.fromkeys([*known, *base.projects, project_id]))
        self._update_tags(base, projects=list(base.projects))

    def destroy(self, base: BaseCopy) -> None:
        # The sidecar goes first: without it the bytes are no base copy any more.
        for suffix in (".json", ".base"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(base.image_id, suffix))
        LOG.info("Image %s: base copy removed from %s", base.image_id, self.name)

    def capacity(self) -> Capacity:
        usage = shutil.disk_usage(self.directory)
        ours = sum(b.size for b in self.list())
        return Capacity(total=usage.total, free=usage.free, ours=ours)
