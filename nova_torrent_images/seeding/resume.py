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

from nova_torrent_images import utils


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
