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

"""How often each image is requested: the sliding-window count behind popularity promotion.

Two callers count requests, one per ``[torrent_images] promotion_source``:

* the compute-side image handler
  (:func:`nova_torrent_images.virt.xenapi.handler.record_request`) for every image it is
  asked for (``promotion_source = handler``); a nova-compute that only counts never loads
  the origin's publisher, tracker or registry code. When an image becomes popular, the
  publishing side (:mod:`nova_torrent_images.origin.promotion`) is imported and publishes
  it in the background;
* the origin seeder counts Glance's ``image.send`` notifications
  (:class:`nova_torrent_images.origin.promotion.ImageSendEndpoint`).

The counter (:class:`RequestCounter`) is a small JSON file of request times per image in
``<origin_state_dir>/promotion/requests.json``, guarded by an oslo.concurrency file lock,
so the notification listener's threads, several processes and restarts all share one
sliding window.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator

from oslo_concurrency import lockutils
from oslo_log import log as logging

from nova_torrent_images.common.utils import atomic_write

LOG = logging.getLogger(__name__)

MAX_TIMES_PER_IMAGE = 10000  # bounds the file whatever the threshold
Clock = Callable[[], float]


class RequestCounter:
    """Request times per image inside a sliding window, shared through a locked file."""

    def __init__(
        self,
        state_dir: str,
        window_seconds: float,
        *,
        clock: Clock = time.time,
        name: str = "promotion",
    ):
        """``name``: what is counted (``promotion`` on origin nodes, ``usage`` for the
        eviction weight of a compute host's base copies), a file and a lock of its own."""
        self.name = name
        self.directory = os.path.join(os.path.abspath(state_dir), name)
        self.path = os.path.join(self.directory, "requests.json")
        self.lock_dir = os.path.join(os.path.abspath(state_dir), "locks")
        self.window = float(window_seconds)
        self.clock = clock

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, list[float]]]:
        os.makedirs(self.directory, exist_ok=True)
        os.makedirs(self.lock_dir, exist_ok=True)
        with lockutils.lock(f"nti-{self.name}", external=True, lock_path=self.lock_dir):
            data = self._load()
            before = json.dumps(data, sort_keys=True)
            yield data
            cutoff = self.clock() - self.window
            for image_id in list(data):
                data[image_id] = [t for t in data[image_id] if t > cutoff][-MAX_TIMES_PER_IMAGE:]
                if not data[image_id]:
                    del data[image_id]
            after = json.dumps(data, sort_keys=True)
            if after != before:
                atomic_write(self.path, after, mode=0o600)

    def _load(self) -> dict[str, list[float]]:
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            LOG.warning("Request counter %s is unreadable (%s); starting afresh", self.path, exc)
            return {}
        if not isinstance(data, dict):
            return {}
        return {
            str(k): [float(t) for t in v if isinstance(t, int | float)]
            for k, v in data.items()
            if isinstance(v, list)
        }

    def record(self, image_id: str, threshold: int | None = None) -> tuple[int, bool]:
        """Count one request now; return (requests in the window, threshold reached).

        Reaching ``threshold`` clears the image's count in the same locked step, so two
        processes never both act on the same crossing.
        """
        now = self.clock()
        with self._locked() as data:
            times = [t for t in data.get(image_id, []) if t > now - self.window]
            times.append(now)
            count = len(times)
            crossed = threshold is not None and count >= threshold
            if crossed:
                data.pop(image_id, None)
            else:
                data[image_id] = times
        return count, crossed

    def counts(self) -> dict[str, int]:
        """Requests in the window, per image (images with none are left out)."""
        now = self.clock()
        with self._locked() as data:
            return {
                image_id: n
                for image_id, times in data.items()
                if (n := len([t for t in times if t > now - self.window]))
            }

    def count(self, image_id: str) -> int:
        now = self.clock()
        with self._locked() as data:
            return len([t for t in data.get(image_id, []) if t > now - self.window])

    def reset(self, image_id: str) -> None:
        with self._locked() as data:
            data.pop(image_id, None)
