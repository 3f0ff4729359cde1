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
"""Per-image locks shared by every process of a host (oslo.concurrency file locks).

One download per image and host: a boot, a prefetch and the eviction policy take the same
``nti-image-<image id>`` lock in ``<state_dir>/locks``. A boot holds it from finding the
base copy until its clone or link exists, so eviction (which only tries the lock) never
deletes a base copy between the two.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

from oslo_concurrency import lockutils

# oslo.concurrency pairs each file lock with an in-process semaphore found by the lock's
# name alone. Simulated hosts in one process (tests, benchmarks, the demo's origin) have
# their own state_dir but the same lock names; one semaphore table per lock directory
# keeps them apart, as separate processes are.
_SEMAPHORES: dict[str, lockutils.Semaphores] = {}
_SEMAPHORES_LOCK = threading.Lock()


def _semaphores(lock_path: str) -> lockutils.Semaphores:
    with _SEMAPHORES_LOCK:
        return _SEMAPHORES.setdefault(os.path.abspath(lock_path), lockutils.Semaphores())


class ImageLocks:
    def __init__(self, lock_path: str) -> None:
        self.lock_path = lock_path
        self._semaphores = _semaphores(lock_path)

    @classmethod
    def in_state_dir(cls, state_dir: str) -> ImageLocks:
        return cls(os.path.join(state_dir, "locks"))

    @staticmethod
    def _name(image_id: str) -> str:
        return f"nti-image-{image_id}"

    @contextlib.contextmanager
    def hold(self, image_id: str) -> Iterator[None]:
        """Wait for the image's lock and hold it for the context."""
        with lockutils.lock(
            self._name(image_id),
            external=True,
            lock_path=self.lock_path,
            semaphores=self._semaphores,
        ):
            yield

    @contextlib.contextmanager
    def try_hold(self, image_id: str) -> Iterator[bool]:
        """Hold the image's lock for the context if it is free now; yield whether it was."""
        try:
            with lockutils.lock(
                self._name(image_id),
                external=True,
                lock_path=self.lock_path,
                semaphores=self._semaphores,
                blocking=False,
                do_log=False,
            ):
                yield True
                return
        except lockutils.AcquireLockFailedException:
            pass
        yield False
