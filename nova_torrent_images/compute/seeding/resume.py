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

"""libtorrent resume data per image: with the store's registry, all a seed needs.

``<state_dir>/seeds/<image_id>.resume`` holds the info dict and merkle trees, so a base
copy is seeded later, and after a restart, without asking the swarm for metadata or
rehashing. It is written after every swarm download, whether or not the downloading
process seeds (a prefetch hands it to nova-compute's process this way).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable

from oslo_log import log as logging

from nova_torrent_images.common import utils

LOG = logging.getLogger(__name__)


class ResumeFiles:
    """Resume data per image id, written atomically."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    @classmethod
    def in_state_dir(cls, state_dir: str) -> ResumeFiles:
        return cls(os.path.join(state_dir, "seeds"))

    def _path(self, image_id: str) -> str:
        return os.path.join(self.directory, f"{image_id}.resume")

    def save(self, image_id: str, data: bytes) -> None:
        utils.atomic_write(self._path(image_id), data, mode=0o600)

    def load(self, image_id: str) -> bytes | None:
        try:
            with open(self._path(image_id), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def remove(self, image_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(image_id))

    def image_ids(self) -> list[str]:
        """The images that have resume data here."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return sorted(n[: -len(".resume")] for n in names if n.endswith(".resume"))

    def remove_orphans(self, base_copies: Callable[[], Iterable[str]]) -> list[str]:
        """Remove resume data of images without a base copy; return their ids.

        The store's metadata is the registry: resume data of an image it does not list is
        what a kill between the base copy's destroy and :meth:`remove` left. Files written
        after the listing began (a download that committed meanwhile) are kept.
        """
        listed_at = time.time()
        keep = set(base_copies())
        removed = []
        for image_id in self.image_ids():
            if image_id in keep:
                continue
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self._path(image_id)).st_mtime >= listed_at:
                    continue
                os.unlink(self._path(image_id))
                removed.append(image_id)
                LOG.info("Image %s: removed resume data left without a base copy", image_id)
        return removed
