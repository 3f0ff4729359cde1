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
"""The periodic thread of a long-running process: prune, adopt new base copies, publish."""

from __future__ import annotations

import threading
from collections.abc import Callable

from oslo_log import log as logging

LOG = logging.getLogger(__name__)


class Maintenance:
    """Runs ``tasks`` every ``interval`` seconds until stopped (0: never)."""

    def __init__(self, interval: float, tasks: list[Callable[[], object]]) -> None:
        self.interval = interval
        self.tasks = tasks
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.interval <= 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="torrent-maintenance", daemon=True)
        self._thread.start()

    def run_once(self) -> None:
        for task in self.tasks:
            try:
                task()
            except Exception:  # noqa: BLE001  keep the loop alive, say why
                LOG.exception(
                    "Periodic maintenance task %s failed", getattr(task, "__name__", task)
                )

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.run_once()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
