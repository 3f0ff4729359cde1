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

"""The per-host download queue: at most N downloads at once, the rest in arrival order."""

from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Iterator

from oslo_log import log as logging

LOG = logging.getLogger(__name__)


class DownloadQueue:
    """At most ``limit`` downloads at once per host; the rest wait in arrival order."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._cond = threading.Condition()
        self._running = 0
        self._waiting: collections.deque[object] = collections.deque()

    @contextlib.contextmanager
    def slot(self, image_id: str) -> Iterator[None]:
        ticket = object()
        with self._cond:
            if self._running >= self.limit or self._waiting:
                LOG.info(
                    "Image %s: waiting for a download slot: %d running, %d queued ahead "
                    "([torrent_images] max_concurrent_downloads=%d)",
                    image_id,
                    self._running,
                    len(self._waiting),
                    self.limit,
                )
            self._waiting.append(ticket)
            while self._waiting[0] is not ticket or self._running >= self.limit:
                self._cond.wait(timeout=1.0)
            self._waiting.popleft()
            self._running += 1
            self._cond.notify_all()
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1
                self._cond.notify_all()
