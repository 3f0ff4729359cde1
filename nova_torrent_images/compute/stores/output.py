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

"""Output-file store: one verified image written to a file the caller names.

``nova-torrent-images fetch IMAGE --output FILE`` goes through the same pipeline as a boot,
into this store. The download lands in ``.<file>.part-<pid>-<n>`` beside ``FILE`` and only a
verified image is linked to ``FILE`` (no-clobber: an existing file is never replaced), so a
killed fetch never leaves a truncated image under the final name; the next run, or any
start of the pipeline on that directory, removes parts of processes that are gone.
Nothing is kept as a base copy: there is no registry, no seeding and no clone.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

from oslo_config import cfg
from oslo_log import log as logging

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
from nova_torrent_images.compute.stores.filesystem import PART, part_owner_pid

LOG = logging.getLogger(__name__)


class OutputFileStore(BaseCopyStore):
    """Writes one image to ``path``; never overwrites it."""

    capabilities = StoreCapabilities(keeps_base_copies=False)

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.directory = os.path.dirname(self.path)
        self._prefix = f".{os.path.basename(self.path)}{PART}"

    @classmethod
    def from_conf(cls, conf: cfg.ConfigOpts, *, path: str, **_context: object) -> OutputFileStore:
        return cls(path)

    @property
    def name(self) -> str:
        return f"file {self.path}"

    def lookup(self, image_id: str) -> BaseCopy | None:
        return None  # an output file is written anew, and never trusted as it is

    def list(self) -> list[BaseCopy]:
        return []

    def remove_stale_slots(self, try_lock: Callable[[str], Any] | None = None) -> int:
        removed = 0
        with contextlib.suppress(FileNotFoundError):
            for entry in os.listdir(self.directory):
                pid = part_owner_pid(entry)
                if entry.startswith(self._prefix) and pid is not None and not utils.pid_alive(pid):
                    LOG.warning("Removing stale partial download %s", entry)
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(self.directory, entry))
                    removed += 1
        return removed

    def begin_download(self, image_id: str, size: int) -> Slot:
        if os.path.lexists(self.path):
            raise exception.StoreError(
                reason=f"destination {self.path} of image {image_id} already exists; "
                "refusing to overwrite it"
            )
        if not os.path.isdir(self.directory):
            raise exception.StoreError(
                reason=f"the directory of destination {self.path} of image {image_id} "
                "does not exist"
            )
        free = self.capacity().free
        if size > free:
            raise exception.StoreFull(
                image_id=image_id, store=self.name, needed=size, available=free
            )
        part = os.path.join(self.directory, f"{self._prefix}{os.getpid()}-{time.monotonic_ns()}")
        return Slot(image_id=image_id, size=size, path=part)

    def commit(self, slot: Slot, info: CommitInfo) -> BaseCopy:
        image = info.image
        with open(slot.path, "rb") as f:
            utils.fsync(f.fileno())
        try:
            os.link(slot.path, self.path)  # no-clobber, unlike a rename
        except FileExistsError as exc:
            raise exception.StoreError(
                reason=f"destination {self.path} of image {image.id} appeared during the "
                "download; refusing to overwrite it"
            ) from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(slot.path)
        utils.fsync_dir(self.directory)
        now = info.created_at
        return BaseCopy(
            image_id=image.id,
            size=image.size,
            hash_algo=image.hash_algo,
            hash_value=image.hash_value,
            info_hash_v1=info.info_hash_v1,
            info_hash_v2=info.info_hash_v2,
            created_at=now,
            last_used=now,
            ref=self.path,
            record=info.record,
        )

    def abort(self, slot: Slot) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(slot.path)
            LOG.info("Image %s: partial download %s removed", slot.image_id, slot.path)

    def destroy(self, base: BaseCopy) -> None:
        raise self._unsupported("deleting what it wrote")

    def touch(self, base: BaseCopy) -> None:
        """Nothing to record: the file is the caller's."""

    def capacity(self) -> Capacity:
        usage = shutil.disk_usage(self.directory)
        return Capacity(total=usage.total, free=usage.free, ours=0)
