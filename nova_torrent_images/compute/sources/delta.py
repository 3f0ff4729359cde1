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
"""A differential image as a source: its delta from Glance, rebuilt over the parent's base copy."""

from __future__ import annotations

import os
import time

from oslo_log import log as logging

from nova_torrent_images import exception
from nova_torrent_images.compute.snapshots.differential import (
    commit_into,
    reconstruct,
    scratch_file,
)
from nova_torrent_images.compute.sources.base import FetchResult, ProgressCallback
from nova_torrent_images.compute.stores.base import BaseCopy, BaseCopyStore, Slot
from nova_torrent_images.glance import verify
from nova_torrent_images.glance.client import GlanceClient
from nova_torrent_images.glance.image import ImageInfo

LOG = logging.getLogger(__name__)


class DeltaSource:
    """A differential image: its delta from Glance, rebuilt over the parent's base copy."""

    name = "delta"

    def __init__(
        self,
        glance: GlanceClient,
        store: BaseCopyStore,
        delta: ImageInfo,
        parent: BaseCopy,
        *,
        scratch_dir: str,
        chain: str,
        verify_hash: bool = True,
        in_parent_clone: bool = False,
    ) -> None:
        """``in_parent_clone``: the slot is a copy-on-write clone of ``parent`` already,
        so only the delta's clusters are written into it (``qemu-img commit``)."""
        self.glance, self.store, self.delta, self.parent = glance, store, delta, parent
        self.scratch_dir, self.chain, self.verify_hash = scratch_dir, chain, verify_hash
        self.in_parent_clone = in_parent_clone

    def fetch_into(
        self, image: ImageInfo, slot: Slot, progress: ProgressCallback | None = None
    ) -> FetchResult:
        """Rebuild ``image`` (the whole view) into ``slot``, verified; typed errors only."""
        start = time.monotonic()
        try:
            if self.delta.disk_format != "qcow2":
                raise exception.UnsafeImage(
                    image_id=self.delta.id,
                    check="disk_format",
                    reason=f"its record says {self.delta.disk_format!r}; a delta is qcow2",
                )
            with scratch_file(self.scratch_dir, self.delta.id) as tmp:
                got = self.glance.download(self.delta, tmp, verify_hash=self.verify_hash)
                if self.in_parent_clone:
                    size = commit_into(
                        tmp, slot.path, image_id=self.delta.id, whole_size=image.size
                    )
                else:
                    with self.store.seed_path(self.parent) as parent_path:
                        size = reconstruct(
                            tmp,
                            parent_path,
                            slot.path,
                            in_place=slot.preallocated,
                            image_id=self.delta.id,
                            whole_size=image.size,
                        )
            # qcow2 sizes are whole 512-byte sectors (check_delta allowed no more); the
            # image may end inside one.
            if size != image.size and not slot.preallocated:
                os.truncate(slot.path, image.size)
            verify.verify_file(image, slot.path, exact_size=not slot.preallocated)
        except exception.DeltaChainError:
            raise
        except exception.UnsafeImage as exc:  # the chain named, the check kept as the cause
            raise exception.DeltaChainError(
                image_id=self.delta.id, chain=self.chain, reason=str(exc)
            ) from exc
        except (exception.IntegrityError, exception.StoreError) as exc:
            raise exception.DeltaChainError(
                image_id=self.delta.id, chain=self.chain, reason=f"the delta is corrupt: {exc}"
            ) from exc
        LOG.info(
            "Image %s: rebuilt from a %d KiB delta over the base copy of image %s (chain "
            "%s), verified",
            self.delta.id,
            got >> 10,
            self.parent.image_id,
            self.chain,
        )
        return FetchResult(
            image_id=image.id,
            destination=slot.path,
            source=self.name,
            seconds=time.monotonic() - start,
            bytes_from_glance=got,
        )
