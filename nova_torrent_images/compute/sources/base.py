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
"""What every source of the pipeline is: the :class:`Source` protocol and its result.

A source writes the verified image into a store's slot and says how it went
(:class:`FetchResult`), or raises. It never cleans up the slot (the pipeline aborts it
through the store that made it) and never decides what happens after a failure: that is
the pipeline's job, in one place. The sources: :mod:`.swarm` (the image's torrent),
:mod:`.glance` (Glance's image data), :mod:`.locations` (the image's own locations and zone
caches, read by :mod:`.readers`) and :mod:`.delta` (a differential image over its parent).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from nova_torrent_images.compute.stores.base import Slot
from nova_torrent_images.glance.image import ImageInfo

# Called on every poll with (bytes done, bytes wanted, payload rate B/s, connected peers).
ProgressCallback = Callable[[int, int, int, int], None]


@dataclass
class FetchResult:
    """How an image reached its slot."""

    image_id: str
    destination: str  # the slot while downloading; the base copy's ref once committed
    source: str  # "torrent", "location", "zone-cache" or "glance"
    seconds: float
    bytes_from_peers: int = 0
    bytes_from_origin: int = 0
    bytes_from_glance: int = 0
    bytes_from_location: int = 0  # an image location or a zone cache (locations.py)
    location: str | None = None  # which one
    fallback_reason: str | None = None
    swarm: object | None = None  # swarm.transfer.SwarmStats of a swarm download
    resume_data: bytes | None = None  # libtorrent resume data, when the swarm delivered it


class Source(Protocol):
    """One way to the image's bytes; the pipeline tries them in ``source_order``."""

    name: str  # in logs and metrics: "torrent", "glance", "locations", "delta"

    def fetch_into(
        self, image: ImageInfo, slot: Slot, progress: ProgressCallback | None = None
    ) -> FetchResult:
        """The verified image into ``slot``; raises a typed error, never cleans the slot."""
        ...
