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
"""Metrics of an origin node, served on ``[torrent_images] origin_metrics_listen``.

The seeder's numbers are read at each scrape (:class:`OriginMetrics`); nothing is kept up
to date between scrapes.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from typing import Any

from oslo_log import log as logging
from prometheus_client import (
    CollectorRegistry,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from nova_torrent_images import exception
from nova_torrent_images.common import utils
from nova_torrent_images.common.metrics import parse_listen

LOG = logging.getLogger(__name__)


class _OriginCollector:
    """Reads the seeder's statistics at each scrape (nothing to keep up to date)."""

    def __init__(self, seeder: Any) -> None:
        self.seeder = seeder  # origin.seeder.OriginSeeder: stats(), uploaded_bytes()

    def describe(self) -> Iterable[Metric]:
        return list(self._families(uploaded=0, images=0, peers=0))

    def collect(self) -> Iterable[Metric]:
        stats = self.seeder.stats()
        return list(
            self._families(
                uploaded=self.seeder.uploaded_bytes(),
                images=len(stats),
                peers=sum(s.peers for s in stats),
            )
        )

    @staticmethod
    def _families(*, uploaded: int, images: int, peers: int) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "nti_origin_uploaded_bytes",
            "Payload bytes the origin seeder uploaded since it started (all images).",
            value=uploaded,
        )
        yield GaugeMetricFamily(
            "nti_origin_images",
            "Published images the origin seeder serves (seeding, or re-downloading "
            "through its web seed).",
            value=images,
        )
        yield GaugeMetricFamily(
            "nti_origin_peers",
            "Peer connections of the origin seeder, summed over its images.",
            value=peers,
        )


class OriginMetrics:
    """The origin seeder's metrics, served over HTTP while the seeder runs."""

    def __init__(self, seeder: Any, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.registry.register(_OriginCollector(seeder))
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def serve(self, listen: str) -> tuple[str, int]:
        """Serve ``/metrics`` on ``listen`` (host:port, that address only) in a thread.

        Returns the bound address. A bad value or an address that cannot be bound is a
        :class:`~nova_torrent_images.exception.ConfigError` naming the option.
        """
        host, port = parse_listen(listen)
        try:
            self._server, self._thread = start_http_server(port, host, registry=self.registry)
        except OSError as exc:
            raise exception.ConfigError(
                option="origin_metrics_listen", reason=f"cannot listen on {listen}: {exc}"
            ) from exc
        bound = self.endpoint
        LOG.info("Origin metrics served on http://%s/metrics", utils.format_host_port(*bound))
        return bound

    @property
    def endpoint(self) -> tuple[str, int] | None:
        if self._server is None:
            return None
        address = self._server.server_address
        return address[0], address[1]

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)
