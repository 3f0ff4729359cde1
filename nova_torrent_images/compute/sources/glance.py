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
"""Glance's image data as a source: streamed into the slot and verified as it streams."""

from __future__ import annotations

import time

from nova_torrent_images.compute.sources.base import FetchResult, ProgressCallback
from nova_torrent_images.compute.stores.base import Slot
from nova_torrent_images.glance.client import GlanceClient
from nova_torrent_images.glance.image import ImageInfo


class GlanceSource:
    """Glance's image data over HTTP, streamed into the slot and verified as it streams."""

    name = "glance"

    def __init__(self, glance: GlanceClient, *, verify_hash: bool) -> None:
        self.glance = glance
        self.verify_hash = verify_hash

    def fetch_into(
        self, image: ImageInfo, slot: Slot, progress: ProgressCallback | None = None
    ) -> FetchResult:
        start = time.monotonic()
        written = self.glance.download(
            image, slot.path, verify_hash=self.verify_hash, preallocated=slot.preallocated
        )
        return FetchResult(
            image_id=image.id,
            destination=slot.path,
            source=self.name,
            seconds=time.monotonic() - start,
            bytes_from_glance=written,
        )
