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
"""The operator's policy for base copies: expiry, maximum age, quota, free-space floor.

:meth:`EvictionPolicy.prune` stops seeding after ``seed_duration`` without use, deletes base
copies unused past ``base_copy_max_age``, and evicts least recently used base copies beyond
``store_quota`` or below ``store_free_space_floor``. :meth:`EvictionPolicy.make_room` does
the last two before a download, counting downloads still running in this process.

Among the base copies that may go, those used least in the recent window
(``eviction_usage_window``: boots and downloads, counted by the pipeline) go first, and
the least recently used among equals: a host under pressure keeps the image most of its
instances came from and evicts a one-off, even one used more recently.

What is never deleted: a base copy instances use, a download in progress (a slot, not a
base copy), and a base copy whose image lock another boot holds (it may be between finding
the base copy and cloning it). Deletion happens under the image's lock.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from oslo_config import cfg
from oslo_log import log as logging
from oslo_utils import units

from nova_torrent_images import exception
from nova_torrent_images.common.popularity import RequestCounter
from nova_torrent_images.compute.seeding.resume import ResumeFiles
from nova_torrent_images.compute.seeding.seeds import SeedManager
from nova_torrent_images.compute.stores.base import BaseCopy, BaseCopyStore

LOG = logging.getLogger(__name__)

# try_lock(image_id) -> a context manager yielding True when it holds the image's lock.
TryLock = Callable[[str], Any]


@contextlib.contextmanager
def _no_lock(image_id: str):
    yield True


@dataclass(frozen=True)
class EvictionSettings:
    seed_duration: int
    base_copy_max_age: int
    store_quota: int  # MiB, 0: none
    store_free_space_floor: int  # MiB, 0: none

    @classmethod
    def from_conf(cls, conf: cfg.ConfigOpts) -> EvictionSettings:
        opts = conf.torrent_images
        return cls(
            opts.seed_duration,
            opts.base_copy_max_age,
            opts.store_quota,
            opts.store_free_space_floor,
        )


def usage_counter(conf: cfg.ConfigOpts) -> RequestCounter | None:
    """The host's count of boots and downloads per image, for the eviction weight."""
    opts = conf.torrent_images
    if not opts.eviction_usage_window:
        return None
    return RequestCounter(opts.state_dir, opts.eviction_usage_window, name="usage")


@dataclass(frozen=True)
class PruneAction:
    image_id: str
    action: str  # "stop-seeding" or "delete"
    reason: str


class EvictionPolicy:
    """Applies the policy to one store (and the seeds of this process, if any)."""

    def __init__(
        self,
        settings: EvictionSettings,
        store: BaseCopyStore,
        resume: ResumeFiles,
        *,
        seeds: SeedManager | None = None,
        try_lock: TryLock | None = None,
        usage: Callable[[], dict[str, int]] | None = None,
    ) -> None:
        """``usage()``: boots and downloads per image in the recent window
        (``eviction_usage_window``), the weight that keeps popular images."""
        self.settings = settings
        self.store = store
        self.resume = resume
        self.seeds = seeds
        self.try_lock = try_lock or _no_lock
        self.usage = usage

    def prune(self, dry_run: bool = False, now: float | None = None) -> list[PruneAction]:
        """Apply expiry, maximum age, quota and free-space floor now."""
        now = time.time() if now is None else now
        s = self.settings
        actions: list[PruneAction] = []
        bases = {b.image_id: b for b in self.store.list()}
        seeding = self.seeds.seeded_bases() if self.seeds is not None else {}
        for image_id, seeded in seeding.items():
            base = bases.get(image_id, seeded)
            if image_id not in bases:
                actions.append(PruneAction(image_id, "stop-seeding", "base copy is gone"))
            elif now - base.last_used > s.seed_duration:
                actions.append(
                    PruneAction(
                        image_id,
                        "stop-seeding",
                        f"unused for {now - base.last_used:.0f}s > [torrent_images] "
                        f"seed_duration={s.seed_duration}",
                    )
                )
        if s.base_copy_max_age:
            for base in bases.values():
                age = now - base.last_used
                if age > s.base_copy_max_age and not base.in_use:
                    actions.append(
                        PruneAction(
                            base.image_id,
                            "delete",
                            f"unused for {age:.0f}s > [torrent_images] base_copy_max_age="
                            f"{s.base_copy_max_age}",
                        )
                    )
        deleted = {a.image_id for a in actions if a.action == "delete"}
        remaining = [b for b in bases.values() if b.image_id not in deleted]
        actions += self._evictions(remaining, extra=0)
        if not dry_run:
            actions = self._apply(actions, bases)
        return actions

    def make_room(self, image_id: str, size: int, in_flight: int = 0) -> list[PruneAction]:
        """Evict least recently used base copies so that ``size`` more bytes fit.

        ``in_flight`` counts other downloads of this process not yet committed: without it
        two concurrent downloads each find room for one and together overshoot the quota.
        """
        bases = {b.image_id: b for b in self.store.list() if b.image_id != image_id}
        actions = self._evictions(list(bases.values()), extra=size + in_flight)
        return self._apply(actions, bases)

    def _evictions(self, bases: list[BaseCopy], extra: int) -> list[PruneAction]:
        s = self.settings
        quota = s.store_quota * units.Mi
        floor = s.store_free_space_floor * units.Mi
        if not quota and not floor:
            return []
        capacity = self.store.capacity()
        ours, free = capacity.ours, capacity.free
        actions = []
        weight = self.weights()
        # The fewest recent uses first, then the least recently used among equals.
        candidates = sorted(
            (b for b in bases if not b.in_use),
            key=lambda b: (weight.get(b.image_id, 0), b.last_used),
        )
        for base in candidates:
            over_quota = quota and ours + extra > quota
            under_floor = floor and free - extra < floor
            if not (over_quota or under_floor):
                break
            why = (
                f"[torrent_images] store_quota={s.store_quota} MiB"
                if over_quota
                else f"[torrent_images] store_free_space_floor={s.store_free_space_floor} MiB"
            )
            uses = weight.get(base.image_id, 0)
            actions.append(
                PruneAction(
                    base.image_id,
                    "delete",
                    f"used {uses} times lately ([torrent_images] eviction_usage_window), the "
                    f"least of the unused base copies, to keep {why}"
                    if self.usage is not None
                    else f"least recently used base copy, to keep {why}",
                )
            )
            ours -= base.size
            free += base.size
        return actions

    def weights(self) -> dict[str, int]:
        """Recent uses per image (empty without a usage count); never fails eviction."""
        if self.usage is None:
            return {}
        try:
            return self.usage()
        except Exception:  # noqa: BLE001  the weight orders eviction, it must not stop it
            LOG.exception("Reading the usage counts of %s failed; evicting by age", self.store.name)
            return {}

    def _apply(self, actions: list[PruneAction], bases: dict[str, BaseCopy]) -> list[PruneAction]:
        """Carry out ``actions``; return those done (a locked base copy is skipped)."""
        done = []
        for action in actions:
            if action.action != "delete":
                LOG.info("Image %s: %s (%s)", action.image_id, action.action, action.reason)
                if self.seeds is not None:
                    self.seeds.stop(action.image_id)
                done.append(action)
                continue
            with self.try_lock(action.image_id) as locked:
                if not locked:
                    LOG.info(
                        "Image %s: base copy kept although %s: a boot is using it now",
                        action.image_id,
                        action.reason,
                    )
                    continue
                base = self.store.lookup(action.image_id) or bases[action.image_id]
                if base.in_use:
                    continue
                LOG.info("Image %s: delete (%s)", action.image_id, action.reason)
                if self.seeds is not None:
                    self.seeds.stop(action.image_id)
                self.store.destroy(base)
                self.resume.remove(action.image_id)
                done.append(action)
        return done

    def evict(self, image_id: str) -> None:
        """Stop seeding and delete a base copy now (the operator's ``evict``)."""
        with self.try_lock(image_id) as locked:
            if not locked:
                raise exception.StoreError(
                    reason=f"the base copy of image {image_id} in {self.store.name} is being "
                    "used by a boot right now; try again"
                )
            base = self.store.lookup(image_id)
            if base is None:
                raise exception.StoreError(
                    reason=f"image {image_id} has no base copy in {self.store.name}"
                )
            if self.seeds is not None:
                self.seeds.stop(image_id)
                base = self.store.lookup(image_id) or base
            if base.in_use:
                raise exception.StoreError(
                    reason=f"the base copy of image {image_id} in {self.store.name} is in use "
                    "by instances; it is kept"
                )
            self.store.destroy(base)
            self.resume.remove(image_id)
