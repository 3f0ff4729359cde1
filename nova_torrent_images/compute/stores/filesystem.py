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
    uploads/<image_id>.disk   a snapshot kept read-only while its upload waits for Glance
    uploads/<image_id>.json   its tags (role queued-upload, image id, project)

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
from oslo_utils.imageutils import format_inspector

from nova_torrent_images import exception
from nova_torrent_images.common import utils
from nova_torrent_images.compute.stores.base import (
    BaseCopy,
    BaseCopyStore,
    Capacity,
    CommitInfo,
    Slot,
    StoreCapabilities,
)

LOG = logging.getLogger(__name__)

PART = ".part-"
UPLOADS = "uploads"  # snapshots kept while their upload waits for Glance
KEPT = ".disk"
QUEUED_UPLOAD = "queued-upload"
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


def qcow2_backing_file(path: str) -> str | None:
    """The backing file the qcow2 image ``path`` names, resolved against its directory.

    None for anything else (no qcow2, no backing file, unreadable). Only the header is
    read (oslo.utils' format inspector), so an instance disk in use can be asked.
    """
    try:
        inspector: Any = format_inspector.QcowInspector.from_file(path)
        header = inspector.qemu_header_info
        offset, length = header.get("bf_offset", 0), header.get("bf_sz", 0)
        if not offset or not 0 < length <= 1023:  # qemu's limit on the name
            return None
        with open(path, "rb") as f:
            f.seek(offset)
            name = f.read(length).decode("utf-8")
    except (OSError, ValueError, format_inspector.ImageFormatError):
        return None
    return os.path.join(os.path.dirname(os.path.abspath(path)), name)


def part_owner_pid(name: str) -> int | None:
    """The pid in a ``<name>.part-<pid>-<n>`` download file name, if it has one."""
    _, sep, rest = name.partition(PART)
    pid = rest.partition("-")[0]
    return int(pid) if sep and pid.isdigit() else None


class FilesystemStore(BaseCopyStore):
    """Base copies in one directory."""

    capabilities = StoreCapabilities(
        seeds=True, clones=True, attach_for_upload=True, adopts_disks=True, clone_slots=True
    )

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
        nova-compute, a running ``nova-torrent-images fetch``) is never touched. The same
        goes for snapshots being kept for a queued upload (``uploads/``).
        """
        removed = self._remove_stale(self.directory, ".base")
        if os.path.isdir(self._uploads_dir()):
            removed += self._remove_stale(self._uploads_dir(), KEPT)
        return removed

    def _remove_stale(self, directory: str, data_suffix: str) -> int:
        removed = 0
        now = time.time()
        for entry in os.listdir(directory):
            path = os.path.join(directory, entry)
            pid = part_owner_pid(entry) or utils.atomic_tmp_owner(entry)
            if pid is not None:
                stale = not utils.pid_alive(pid)
            elif entry.endswith(data_suffix):
                try:
                    changed = os.lstat(path).st_ctime
                except FileNotFoundError:
                    continue
                stale = (
                    not os.path.exists(path[: -len(data_suffix)] + ".json")
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
            utils.fsync(f.fileno())
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
        """A base copy of the file ``ref`` (a snapshot just uploaded), committed from a slot.

        A file of this store (a kept copy, a disk converted for a delta) is hard-linked:
        nothing writes to it any more. Any other file (Nova's) is copied (a reflink where
        the filesystem can) and left to its owner.
        """
        slot = self.begin_download(info.image.id, info.image.size)
        try:
            self._bring(ref, slot.path, f"keeping snapshot {ref} of image {info.image.id}")
            return self.commit(slot, info)
        except BaseException:
            self.abort(slot)
            raise

    def begin_from(self, base: BaseCopy, image_id: str, size: int) -> Slot:
        """A slot holding ``base``'s bytes: a reflink where the filesystem can, else a copy.

        A differential image is then rebuilt by writing only the delta's clusters into it.
        """
        slot = self.begin_download(image_id, size)
        try:
            reflink_copy(
                base.ref,
                slot.path,
                f"copying the base copy of image {base.image_id} to rebuild image {image_id}",
                sparse=True,
            )
            os.chmod(slot.path, 0o644)  # written in place; commit makes it read-only
            if os.path.getsize(slot.path) < size:
                os.truncate(slot.path, size)  # the image grew
        except BaseException:
            self.abort(slot)
            raise
        return slot

    # -- snapshots (doc/source/snapshots.rst) ------------------------------------------
    def _uploads_dir(self) -> str:
        return os.path.join(self.directory, UPLOADS)

    def _is_ours(self, path: str) -> bool:
        return os.path.dirname(os.path.abspath(path)) in (self.directory, self._uploads_dir())

    def _bring(self, src: str, dst: str, what: str) -> None:
        """``dst`` gets the bytes of ``src``: a hard link of a file of this store, else a
        reflink or copy (``what`` names it in errors)."""
        if self._is_ours(src):
            try:
                os.link(src, dst)
                return
            except OSError as exc:
                LOG.debug("%s: cannot hard-link %s (%s); copying it", what, src, exc)
        reflink_copy(src, dst, what)

    @contextlib.contextmanager
    def attached(self, ref: str, mode: str = "RO") -> Iterator[str]:
        """A disk of this host (a file) is its own path; only read-only use is offered."""
        if mode != "RO":
            raise exception.StoreError(reason=f"{self.name} attaches disks read-only only")
        if not os.path.isfile(ref):
            raise exception.StoreError(reason=f"{ref} is no disk file of this host")
        yield ref

    def parent_base(self, ref: str) -> BaseCopy | None:
        """The base copy the disk file ``ref`` is a qcow2 overlay of, if it is one.

        Nova's qcow2 instance disks name ``_base/<name>`` as their backing file, a hard
        link of the base copy when the image came through this library.
        """
        backing = qcow2_backing_file(ref)
        if backing is None:
            return None
        try:
            wanted = os.stat(backing)
        except OSError:
            return None
        for base in self.list():
            try:
                st = os.stat(base.ref)
            except FileNotFoundError:
                continue
            if (st.st_dev, st.st_ino) == (wanted.st_dev, wanted.st_ino):
                return base
        return None

    def _kept_path(self, image_id: str) -> str:
        self._path(image_id, "")  # the same check of the id
        return os.path.join(self._uploads_dir(), image_id + KEPT)

    def keep_for_upload(self, ref: str, image_id: str, project_id: str | None) -> str:
        """``uploads/<image_id>.disk``, read-only, then its tags; returns its path."""
        data = self._kept_path(image_id)
        os.makedirs(self._uploads_dir(), exist_ok=True)
        tmp = f"{data}{PART}{os.getpid()}-{time.monotonic_ns()}"
        try:
            self._bring(ref, tmp, f"keeping snapshot {ref} of image {image_id} for its upload")
            with open(tmp, "rb") as f:
                utils.fsync(f.fileno())
            os.chmod(tmp, 0o444)
            os.replace(tmp, data)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        tags = {
            "role": QUEUED_UPLOAD,
            "image_id": image_id,
            "project": project_id or "",
            "created": time.time(),
        }
        # Written last: a kept copy without its tags is unfinished (removed at a start).
        utils.atomic_write(data[: -len(KEPT)] + ".json", json.dumps(tags, indent=1))
        return data

    def drop_kept(self, ref: str) -> None:
        if os.path.dirname(os.path.abspath(ref)) != self._uploads_dir() or not ref.endswith(KEPT):
            raise exception.StoreError(reason=f"{ref} is no copy kept for an upload in {self.name}")
        for path in (ref[: -len(KEPT)] + ".json", ref):  # the tags go first
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def disk_size(self, ref: str) -> int:
        return os.path.getsize(ref)

    def kept_for_upload(self) -> dict[str, str]:
        kept: dict[str, str] = {}
        try:
            entries = sorted(os.listdir(self._uploads_dir()))
        except FileNotFoundError:
            return kept
        for entry in entries:
            if not entry.endswith(".json") or entry.startswith("."):
                continue
            data = os.path.join(self._uploads_dir(), entry[: -len(".json")] + KEPT)
            try:
                with open(os.path.join(self._uploads_dir(), entry)) as f:
                    tags = json.load(f)
            except (OSError, ValueError) as exc:
                LOG.warning("Ignoring unreadable kept copy %s in %s: %s", entry, self.name, exc)
                continue
            if tags.get("role") == QUEUED_UPLOAD and os.path.exists(data):
                kept[data] = str(tags.get("image_id", ""))
        return kept

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

    def refresh_record(
        self, base: BaseCopy, record: dict[str, Any], projects: tuple[str, ...]
    ) -> None:
        # One atomic rewrite of the sidecar: readers see the old record and projects or
        # the new ones, never a mix; a failed write leaves the old sidecar whole.
        self._update_tags(base, record=record, projects=list(projects))
        base.record, base.projects = dict(record), tuple(projects)

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
