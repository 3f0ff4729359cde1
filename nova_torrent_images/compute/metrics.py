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
"""Metrics of a compute host: fetches, bytes by source, base copies, seeds, queued uploads.

A compute host runs inside nova-compute, which serves no HTTP: the pipeline writes
``[torrent_images] metrics_textfile`` for node_exporter's textfile collector
(:meth:`Metrics.write_textfile`, atomic: written beside it, then renamed). A process uses
:func:`get_metrics` unless its pipeline is given another.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING

from oslo_log import log as logging
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    write_to_textfile,
)

from nova_torrent_images.common.metrics import error_label

if TYPE_CHECKING:
    from nova_torrent_images.compute.seeding.seeds import SeedManager
    from nova_torrent_images.compute.snapshots.uploads import QueuedUpload
    from nova_torrent_images.compute.sources.base import FetchResult
    from nova_torrent_images.compute.stores.base import BaseCopyStore

LOG = logging.getLogger(__name__)

#: Fetch durations: a small image from a warm swarm takes about a second, a large one from
#: a cold swarm or a slow Glance up to ``overall_timeout`` (30 minutes by default).
FETCH_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 900, 1200, 1800)

BYTE_SOURCES = ("peers", "origin", "location", "glance")
FETCH_SOURCES = ("torrent", "locations", "location", "zone-cache", "glance")
OUTCOMES = ("ok", "error")
# Why a swarm download fails; exported at 0 from the start so rates work from the first one.
FALLBACK_REASONS = (
    "MetadataTimeout",
    "TorrentStalled",
    "TorrentTimeout",
    "TorrentMismatch",
    "TorrentStorageError",
    "IntegrityError",
    "TorrentFetchError",
)


class Metrics:
    """The compute host's metrics: downloads, fallbacks, base copies, seeds and the store."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.image_bytes = Counter(
            "nti_image_bytes",
            "Image bytes delivered to this host, by where they came from (peers: other "
            "compute hosts; origin: origin seeders and web seeds; glance: Glance over HTTP).",
            ["source"],
            registry=r,
        )
        self.fetch_seconds = Histogram(
            "nti_fetch_seconds",
            "Duration of successful image downloads into the store, by source.",
            ["source"],
            buckets=FETCH_BUCKETS,
            registry=r,
        )
        self.fetches = Counter(
            "nti_fetches",
            "Image downloads by source (torrent, glance) and outcome (ok, error).",
            ["source", "outcome"],
            registry=r,
        )
        self.fetch_errors = Counter(
            "nti_fetch_errors",
            "Failed image downloads by source and error class.",
            ["source", "error"],
            registry=r,
        )
        self.fallbacks = Counter(
            "nti_fallbacks",
            "Swarm downloads that failed and fell back to Glance, by error class.",
            ["reason"],
            registry=r,
        )
        self.hash_failures = Counter(
            "nti_hash_failures",
            "Pieces of completed swarm downloads that failed their hash check.",
            registry=r,
        )
        self.peers_banned = Counter(
            "nti_peers_banned",
            "Peers libtorrent banned or refused during completed swarm downloads.",
            registry=r,
        )
        self.base_copy_hits = Counter(
            "nti_base_copy_hits",
            "Requests served by a base copy already in the store (nothing downloaded).",
            registry=r,
        )
        self.seeds = Gauge("nti_seeds", "Base copies this host seeds now.", registry=r)
        self.seed_uploaded = Gauge(
            "nti_seed_uploaded_bytes",
            "Payload bytes uploaded by the current seeds, over their lifetime.",
            registry=r,
        )
        self.store_bytes = Gauge(
            "nti_store_bytes",
            "The store: bytes held by base copies (ours), free and total.",
            ["kind"],
            registry=r,
        )
        self.base_copies = Gauge("nti_base_copies", "Base copies in the store.", registry=r)
        self.queued_uploads = Gauge(
            "nti_queued_uploads", "Snapshot uploads waiting for Glance.", registry=r
        )
        self.queued_upload_bytes = Gauge(
            "nti_queued_upload_bytes",
            "Bytes of the snapshots kept read-only while their upload waits for Glance.",
            registry=r,
        )
        self._textfile_lock = threading.Lock()
        for source in BYTE_SOURCES:
            self.image_bytes.labels(source=source)
        for source in FETCH_SOURCES:
            self.fetch_seconds.labels(source=source)
            for outcome in OUTCOMES:
                self.fetches.labels(source=source, outcome=outcome)
        for reason in FALLBACK_REASONS:
            self.fallbacks.labels(reason=reason)

    # -- events --------------------------------------------------------------------------
    def fetch_succeeded(self, result: FetchResult) -> None:
        """Count a download that reached a base copy."""
        self.fetches.labels(source=result.source, outcome="ok").inc()
        self.fetch_seconds.labels(source=result.source).observe(result.seconds)
        for source, value in (
            ("peers", result.bytes_from_peers),
            ("origin", result.bytes_from_origin),
            ("location", result.bytes_from_location),
            ("glance", result.bytes_from_glance),
        ):
            if value:
                self.image_bytes.labels(source=source).inc(value)
        swarm = result.swarm
        if swarm is not None:
            self.hash_failures.inc(getattr(swarm, "hash_failures", 0))
            self.peers_banned.inc(getattr(swarm, "peers_banned", 0))

    def fetch_failed(self, source: str, exc: BaseException) -> None:
        """Count a download of ``source`` (torrent or glance) that raised ``exc``."""
        self.fetches.labels(source=source, outcome="error").inc()
        self.fetch_errors.labels(source=source, error=error_label(exc)).inc()

    def fallback(self, exc: BaseException) -> None:
        """Count a swarm failure that leads to a Glance download."""
        self.fallbacks.labels(reason=error_label(exc)).inc()

    def base_copy_hit(self) -> None:
        self.base_copy_hits.inc()

    # -- state ---------------------------------------------------------------------------
    def observe_store(self, store: BaseCopyStore, seeds: SeedManager | None) -> None:
        """Set the store and seed gauges from ``store`` and ``seeds`` now."""
        capacity = store.capacity()
        self.store_bytes.labels(kind="ours").set(capacity.ours)
        self.store_bytes.labels(kind="free").set(capacity.free)
        self.store_bytes.labels(kind="total").set(capacity.total)
        if seeds is None:
            self.base_copies.set(len(store.list()))
            self.seeds.set(0)
            self.seed_uploaded.set(0)
            return
        statuses = seeds.status()  # one entry per base copy of the store
        self.base_copies.set(len(statuses))
        seeding = [s for s in statuses if s.seeding]
        self.seeds.set(len(seeding))
        self.seed_uploaded.set(sum(s.bytes_up for s in seeding))

    def observe_uploads(self, queued: Iterable[QueuedUpload]) -> None:
        """Set the queued-upload gauges from the queue's entries (``size`` in bytes)."""
        entries = list(queued)
        self.queued_uploads.set(len(entries))
        self.queued_upload_bytes.set(sum(e.size for e in entries))

    # -- exposition ----------------------------------------------------------------------
    def write_textfile(self, path: str) -> None:
        """Write every metric to ``path`` for node_exporter's textfile collector, atomically.

        The text goes to ``<path>.<pid>.<thread>`` first and is renamed over ``path``, so
        the collector reads the old file or the new one, never half of one (and does not
        read the temporary one: it takes only ``*.prom`` files).
        """
        with self._textfile_lock:
            write_to_textfile(path, self.registry)

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """A sample's current value (0 when it does not exist yet), for tests and tools."""
        return self.registry.get_sample_value(name, labels or {}) or 0.0


_DEFAULT: Metrics | None = None
_DEFAULT_LOCK = threading.Lock()


def get_metrics() -> Metrics:
    """This process's compute metrics (created on first use)."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = Metrics()
        return _DEFAULT
