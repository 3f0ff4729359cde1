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
"""Seeds: the base copies this process serves to other hosts.

After a verified swarm download the base copy is added to the process's libtorrent session
as a seed, from its read-only view, with its resume data so nothing is rehashed: seed mode
checks each piece lazily the first time a peer asks for it. A base copy without resume
data (it came from Glance over HTTP) is not seeded: this host never saw its torrent.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from oslo_config import cfg
from oslo_log import log as logging

from nova_torrent_images.compute.seeding.resume import ResumeFiles
from nova_torrent_images.compute.stores.base import BaseCopy, BaseCopyStore
from nova_torrent_images.swarm import recipes
from nova_torrent_images.swarm.engine import SwarmEngine, TorrentWatch

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class SeedSettings:
    seed_duration: int  # seconds after the last use; 0: never seed
    max_seeds: int
    trackers: tuple[str, ...]

    @classmethod
    def from_conf(cls, conf: cfg.ConfigOpts) -> SeedSettings:
        opts = conf.torrent_images
        return cls(opts.seed_duration, opts.max_seeds, tuple(opts.trackers))


@dataclass
class Seed:
    base: BaseCopy
    watch: TorrentWatch
    view: contextlib.ExitStack
    started_at: float


@dataclass
class SeedStatus:
    image_id: str
    size: int
    seeding: bool
    in_use: bool
    last_used: float
    created_at: float
    bytes_up: int = 0
    bytes_down: int = 0
    peers: int = 0
    info_hash: str | None = None


class SeedManager:
    """The seeds of one store in one process's libtorrent session."""

    def __init__(
        self,
        settings: SeedSettings,
        store: BaseCopyStore,
        engine: SwarmEngine | Callable[[], SwarmEngine],
        resume: ResumeFiles,
    ) -> None:
        """``engine`` may be a factory: the session starts only when there is a seed."""
        self.settings = settings
        self.store = store
        self._engine = engine
        self.resume = resume
        self._seeds: dict[str, Seed] = {}
        self._lock = threading.RLock()
        self._told_no_metadata: set[str] = set()

    def start(self, base: BaseCopy, now: float | None = None) -> bool:
        """Seed ``base`` unless policy says no; True when it is seeded afterwards."""
        now = time.time() if now is None else now
        settings = self.settings
        if settings.seed_duration == 0 or settings.max_seeds == 0:
            return False
        if now - base.last_used > settings.seed_duration:
            return False
        data = self.resume.load(base.image_id)
        if data is None:
            if base.image_id not in self._told_no_metadata:
                self._told_no_metadata.add(base.image_id)
                LOG.info(
                    "Image %s: not seeded: this host has no torrent metadata for it (it "
                    "came from Glance over HTTP)",
                    base.image_id,
                )
            return False
        with self._lock:
            if base.image_id in self._seeds:
                self._seeds[base.image_id].base = base
                return True
            if len(self._seeds) >= settings.max_seeds:
                oldest = min(self._seeds.values(), key=lambda s: s.base.last_used)
                if oldest.base.last_used >= base.last_used:
                    return False
                LOG.info(
                    "Image %s: stops seeding to stay within [torrent_images] max_seeds=%d",
                    oldest.base.image_id,
                    settings.max_seeds,
                )
                self._stop_locked(oldest.base.image_id)
            view = contextlib.ExitStack()
            try:
                path = view.enter_context(self.store.seed_path(base))
                params = recipes.seed_params(data, path=path, trackers=list(settings.trackers))
                engine = self.engine
                watch = engine.add_torrent(params, label=f"seed of image {base.image_id}")
            except BaseException:
                view.close()
                raise
            self._seeds[base.image_id] = Seed(base, watch, view, now)
        LOG.info("Image %s: seeding from %s in %s", base.image_id, path, self.store.name)
        return True

    @property
    def engine(self) -> SwarmEngine:
        if callable(self._engine) and not isinstance(self._engine, SwarmEngine):
            self._engine = self._engine()
        return self._engine

    def stop(self, image_id: str) -> bool:
        with self._lock:
            return self._stop_locked(image_id)

    def _stop_locked(self, image_id: str) -> bool:
        seed = self._seeds.pop(image_id, None)
        if seed is None:
            return False
        try:
            self.engine.remove_torrent(seed.watch)
        finally:
            seed.view.close()
        LOG.info("Image %s: no longer seeded", image_id)
        return True

    def seeding(self) -> list[str]:
        """Image ids of every seed now."""
        with self._lock:
            return list(self._seeds)

    def seeded_bases(self) -> dict[str, BaseCopy]:
        """Image id -> base copy of every seed now."""
        with self._lock:
            return {image_id: seed.base for image_id, seed in self._seeds.items()}

    def resume_all(self) -> int:
        """Seed every base copy of the store that policy allows (at start, periodically)."""
        started = 0
        for base in sorted(self.store.list(), key=lambda b: b.last_used, reverse=True):
            try:
                if base.image_id not in self._seeds and self.start(base):
                    started += 1
            except Exception:  # noqa: BLE001  one bad base copy must not stop the others
                LOG.exception("Image %s: could not resume seeding", base.image_id)
        if started:
            LOG.info("Resumed seeding %d base copies from %s", started, self.store.name)
        return started

    def shutdown(self) -> None:
        with self._lock:
            for image_id in list(self._seeds):
                self._stop_locked(image_id)

    def status(self) -> list[SeedStatus]:
        result = []
        with self._lock:
            seeds = dict(self._seeds)
        for base in self.store.list():
            st = SeedStatus(
                base.image_id,
                base.size,
                base.image_id in seeds,
                base.in_use,
                base.last_used,
                base.created_at,
                info_hash=base.info_hash,
            )
            seed = seeds.get(base.image_id)
            if seed is not None:
                counters = seed.watch.counters()
                st.bytes_up, st.bytes_down = counters.uploaded, counters.downloaded
                st.peers = counters.peers
            result.append(st)
        return result
