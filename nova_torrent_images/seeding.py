"""Local seeds: base copies this host serves to others, and the policy that ends them.

After a verified swarm download the base copy is added to the process's libtorrent
session as a seed, from its read-only view, with libtorrent's resume data so nothing is
rehashed: seed mode checks each piece lazily the first time a peer asks for it. The resume
data lives in ``<state_dir>/seeds/<image_id>.resume``; together with the store's own
registry it is all a restarted process needs to seed again.

:meth:`SeedManager.prune` applies the operator's policy: stop seeding after
``seed_duration`` without use, delete base copies unused past ``base_copy_max_age``, and
evict least recently used base copies beyond ``store_quota`` or below
``store_free_space_floor``. A base copy that instances use is never deleted, and a
download in progress is a slot, not a base copy, so it is never a candidate.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import threading
import time
from dataclasses import asdict, dataclass

import libtorrent as lt
from oslo_config import cfg
from oslo_log import log as logging

from nova_torrent_images import exception
from nova_torrent_images.stores.base import BaseCopy, BaseCopyStore
from nova_torrent_images.swarm.engine import SwarmEngine, TorrentWatch

LOG = logging.getLogger(__name__)
MiB = 1024 * 1024


class ResumeFiles:
    """libtorrent resume data per image id, written atomically."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def _path(self, image_id: str) -> str:
        return os.path.join(self.directory, f"{image_id}.resume")

    def save(self, image_id: str, data: bytes) -> None:
        os.makedirs(self.directory, exist_ok=True)
        tmp = self._path(image_id) + f".tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._path(image_id))

    def load(self, image_id: str) -> bytes | None:
        try:
            with open(self._path(image_id), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def remove(self, image_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(image_id))


@dataclass
class Seed:
    base: BaseCopy
    watch: TorrentWatch
    view: contextlib.ExitStack
    started_at: float


@dataclass(frozen=True)
class PruneAction:
    image_id: str
    action: str  # "stop-seeding" or "delete"
    reason: str


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
        self, conf: cfg.ConfigOpts, store: BaseCopyStore, engine: SwarmEngine | None
    ) -> None:
        """``engine`` may be None for a process that only applies policy (the CLI)."""
        self.conf = conf
        self.opts = conf.torrent_images
        self.store = store
        self.engine = engine
        self.resume = ResumeFiles(os.path.join(self.opts.state_dir, "seeds"))
        self._seeds: dict[str, Seed] = {}
        self._lock = threading.RLock()
        self._periodic: threading.Thread | None = None
        self._stop = threading.Event()

    # -- seeding -----------------------------------------------------------------------
    def register_download(self, base: BaseCopy, resume_data: bytes | None) -> bool:
        """Keep what seeding needs of a fresh base copy, then seed it."""
        if resume_data:
            self.resume.save(base.image_id, resume_data)
        return self.start(base)

    def start(self, base: BaseCopy, now: float | None = None) -> bool:
        """Seed ``base`` unless policy says no; True when it is seeded afterwards."""
        now = time.time() if now is None else now
        if self.opts.seed_duration == 0 or self.opts.max_seeds == 0 or self.engine is None:
            return False
        if now - base.last_used > self.opts.seed_duration:
            return False
        data = self.resume.load(base.image_id)
        if data is None:
            LOG.debug("Image %s: no torrent metadata on this host; not seeding", base.image_id)
            return False
        with self._lock:
            if base.image_id in self._seeds:
                self._seeds[base.image_id].base = base
                return True
            if len(self._seeds) >= self.opts.max_seeds:
                oldest = min(self._seeds.values(), key=lambda s: s.base.last_used)
                if oldest.base.last_used >= base.last_used:
                    return False
                LOG.info(
                    "Image %s: stops seeding to stay within [torrent_images] max_seeds=%d",
                    oldest.base.image_id,
                    self.opts.max_seeds,
                )
                self._stop_locked(oldest.base.image_id)
            view = contextlib.ExitStack()
            try:
                path = view.enter_context(self.store.seed_path(base))
                params = lt.read_resume_data(data)
                params.save_path = os.path.dirname(path)
                params.renamed_files = {0: path}
                params.trackers = list(dict.fromkeys([*params.trackers, *self.opts.trackers]))
                # Verified data: seed mode with no file check (a device's size reads as 0,
                # which would otherwise force a full recheck); pieces are still hashed
                # lazily on first request. Never paused or queued.
                flags = lt.torrent_flags.default_flags | lt.torrent_flags.seed_mode
                flags |= lt.torrent_flags.no_verify_files
                flags &= ~lt.torrent_flags.auto_managed & ~lt.torrent_flags.paused
                params.flags = flags
                watch = self.engine.add_torrent(params, label=f"seed of image {base.image_id}")
            except BaseException:
                view.close()
                raise
            self._seeds[base.image_id] = Seed(base, watch, view, now)
        LOG.info("Image %s: seeding from %s in %s", base.image_id, path, self.store.name)
        return True

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
        with self._lock:
            return list(self._seeds)

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
        self._stop.set()
        if self._periodic is not None:
            self._periodic.join(timeout=5)
        with self._lock:
            for image_id in list(self._seeds):
                self._stop_locked(image_id)

    # -- policy ------------------------------------------------------------------------
    def prune(self, dry_run: bool = False, now: float | None = None) -> list[PruneAction]:
        """Apply expiry, maximum age, quota and free-space floor now."""
        now = time.time() if now is None else now
        actions: list[PruneAction] = []
        bases = {b.image_id: b for b in self.store.list()}
        with self._lock:
            for image_id, seed in list(self._seeds.items()):
                base = bases.get(image_id, seed.base)
                if image_id not in bases:
                    actions.append(PruneAction(image_id, "stop-seeding", "base copy is gone"))
                elif now - base.last_used > self.opts.seed_duration:
                    actions.append(
                        PruneAction(
                            image_id,
                            "stop-seeding",
                            f"unused for {now - base.last_used:.0f}s > [torrent_images] "
                            f"seed_duration={self.opts.seed_duration}",
                        )
                    )
        if self.opts.base_copy_max_age:
            for base in bases.values():
                age = now - base.last_used
                if age > self.opts.base_copy_max_age and not base.in_use:
                    actions.append(
                        PruneAction(
                            base.image_id,
                            "delete",
                            f"unused for {age:.0f}s > [torrent_images] base_copy_max_age="
                            f"{self.opts.base_copy_max_age}",
                        )
                    )
        deleted = {a.image_id for a in actions if a.action == "delete"}
        remaining = [b for b in bases.values() if b.image_id not in deleted]
        actions += self._evictions(remaining, extra=0)
        if not dry_run:
            self._apply(actions, bases)
        return actions

    def make_room(self, image_id: str, size: int) -> list[PruneAction]:
        """Evict least recently used base copies so that ``size`` more bytes fit."""
        bases = {b.image_id: b for b in self.store.list()}
        actions = self._evictions(list(bases.values()), extra=size)
        self._apply(actions, bases)
        return actions

    def _evictions(self, bases: list[BaseCopy], extra: int) -> list[PruneAction]:
        quota = self.opts.store_quota * MiB
        floor = self.opts.store_free_space_floor * MiB
        if not quota and not floor:
            return []
        capacity = self.store.capacity()
        ours, free = capacity.ours, capacity.free
        actions = []
        candidates = sorted((b for b in bases if not b.in_use), key=lambda b: b.last_used)
        for base in candidates:
            over_quota = quota and ours + extra > quota
            under_floor = floor and free - extra < floor
            if not (over_quota or under_floor):
                break
            why = (
                f"[torrent_images] store_quota={self.opts.store_quota} MiB"
                if over_quota
                else f"[torrent_images] store_free_space_floor="
                f"{self.opts.store_free_space_floor} MiB"
            )
            actions.append(
                PruneAction(
                    base.image_id, "delete", f"least recently used base copy, to keep {why}"
                )
            )
            ours -= base.size
            free += base.size
        return actions

    def _apply(self, actions: list[PruneAction], bases: dict[str, BaseCopy]) -> None:
        for action in actions:
            LOG.info("Image %s: %s (%s)", action.image_id, action.action, action.reason)
            self.stop(action.image_id)
            if action.action == "delete":
                self.store.destroy(bases[action.image_id])
                self.resume.remove(action.image_id)

    def evict(self, image_id: str) -> None:
        """Stop seeding and delete a base copy now (the operator's ``evict``)."""
        base = self.store.lookup(image_id)
        if base is None:
            raise exception.StoreError(
                reason=f"image {image_id} has no base copy in {self.store.name}"
            )
        self.stop(image_id)
        base = self.store.lookup(image_id) or base
        if base.in_use:
            raise exception.StoreError(
                reason=f"the base copy of image {image_id} in {self.store.name} is in use "
                "by instances; it is kept"
            )
        self.store.destroy(base)
        self.resume.remove(image_id)

    # -- status ------------------------------------------------------------------------
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
                ts = seed.watch.handle.status()
                st.bytes_up, st.bytes_down = ts.all_time_upload, ts.all_time_download
                st.peers = ts.num_peers
            result.append(st)
        return result

    def write_status_file(self) -> None:
        """Publish status for ``nova-torrent-images status`` in other processes."""
        path = os.path.join(self.opts.state_dir, "status.json")
        os.makedirs(self.opts.state_dir, exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(
                {
                    "pid": os.getpid(),
                    "time": time.time(),
                    "store": self.store.name,
                    "images": [asdict(s) for s in self.status()],
                },
                f,
                indent=1,
            )
        os.replace(tmp, path)

    def start_periodic(self) -> None:
        """Prune, adopt new base copies and publish status every ``prune_interval``."""
        interval = self.opts.prune_interval
        if interval <= 0 or self._periodic is not None:
            return

        def loop() -> None:
            while not self._stop.wait(interval):
                try:
                    self.prune()
                    self.resume_all()
                    self.write_status_file()
                except Exception:  # noqa: BLE001  keep the loop alive, say why
                    LOG.exception("Periodic seeding maintenance failed")

        self._periodic = threading.Thread(target=loop, name="torrent-seed-policy", daemon=True)
        self._periodic.start()


class DownloadQueue:
    """At most ``limit`` downloads at once per host; the rest wait in arrival order."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._cond = threading.Condition()
        self._running = 0
        self._waiting: collections.deque[object] = collections.deque()

    @contextlib.contextmanager
    def slot(self, image_id: str):
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
