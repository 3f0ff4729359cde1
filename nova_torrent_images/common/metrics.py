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
"""What the compute and origin metrics share: bounded labels and endpoint parsing.

Each :class:`~nova_torrent_images.compute.metrics.Metrics` (compute side) and
:class:`~nova_torrent_images.origin.metrics.OriginMetrics` (origin side) owns a
``CollectorRegistry`` of its own, never prometheus_client's global one, so tests and
several simulated hosts in one process keep their numbers apart.

Label values are bounded: sources and outcomes are fixed words, error labels are class
names of :mod:`nova_torrent_images.exception` (anything else is ``other``), never a
message, image id or peer address.
"""

from __future__ import annotations

from nova_torrent_images import exception
from nova_torrent_images.common import utils


def error_label(exc: BaseException) -> str:
    """The bounded label of a failure: its class name in our exception module, or ``other``.

    A swarm source wraps what it does not raise itself (a hash mismatch found by the final
    check, a store error) in a plain ``TorrentFetchError``; the wrapped class says more.
    """
    cause = exc.__cause__
    if type(exc) is exception.TorrentFetchError and isinstance(cause, exception.TorrentImagesError):
        exc = cause
    if isinstance(exc, exception.TorrentImagesError):
        return type(exc).__name__
    return "other"


def parse_listen(value: str, option: str = "origin_metrics_listen") -> tuple[str, int]:
    """``host:port`` of a metrics endpoint (port 0: any free port), or a ConfigError."""
    try:
        return utils.parse_listen_address(value)
    except ValueError as exc:
        raise exception.ConfigError(option=option, reason=str(exc)) from exc
