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
"""The image's own locations and the zone's caches, as sources a host reads directly.

Glance v2 can list where an image's bytes live (``locations`` with
``show_multiple_locations``, ``direct_url`` with ``show_image_direct_url``). A compute host
that can read one of them without Glance in the middle does so:

* ``file://`` on storage the host mounts, ``http://``/``https://`` (a web store): read by
  the location readers (:mod:`.readers`);
* zone caches configured per host (``[torrent_images] zone_caches``, deprecated): an HTTP
  caching proxy in front of the Glance API, read as ``<cache>/v2/images/<id>/file``
  without a token, so only a Glance that serves image data without one answers, and a
  proxy caching authenticated image data would serve it to anyone; a caching proxy in
  front of the origin's stripe server replaces it (doc/source/origin.rst).

Locations are ranked by the operator's preference
(``location_preference``: URL prefixes, first wins), then by zone affinity (a location
whose metadata names ``[torrent_images] zone``), then by the throughput measured on earlier
fetches (``<state_dir>/source-throughput.json``). A failure or a stall moves to the next
one, continuing at the byte the last one reached; every byte is checked against Glance's
hash as it is written, as on the Glance path.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.parse
from dataclasses import dataclass

from oslo_config import cfg
from oslo_log import log as logging
from oslo_utils import units

from nova_torrent_images import exception
from nova_torrent_images.common import utils
from nova_torrent_images.compute.sources.base import FetchResult, ProgressCallback
from nova_torrent_images.compute.sources.readers import (
    Location,
    ReadRequest,
    WrittenPrefix,
    load_reader,
)
from nova_torrent_images.compute.stores.base import Slot
from nova_torrent_images.glance import verify
from nova_torrent_images.glance.image import ImageInfo

LOG = logging.getLogger(__name__)

_zone_caches_warned = False
_zone_caches_lock = threading.Lock()


def warn_zone_caches(caches: tuple[str, ...]) -> bool:
    """Log once per process that the deprecated ``zone_caches`` are used; True that time."""
    global _zone_caches_warned
    with _zone_caches_lock:
        if _zone_caches_warned:
            return False
        _zone_caches_warned = True
    LOG.warning(
        "[torrent_images] zone_caches (%s) is deprecated for removal: the caches are read "
        "without a token, so only a Glance serving image data without one (noauth, or a "
        "trusted internal endpoint) answers, and a proxy caching authenticated image data "
        "serves it to any project. Put the caching proxy in front of the origin's stripe "
        "server and advertise it with origin_stripe_advertise instead",
        ", ".join(caches),
    )
    return True


@dataclass(frozen=True)
class LocationSettings:
    preference: tuple[str, ...]
    zone: str | None
    zone_caches: tuple[str, ...]
    stall_timeout: float
    state_dir: str
    file_prefixes: tuple[str, ...] = ()  # where file:// locations may be read
    min_rate: int = 0  # bytes/s an http(s) location must send at least

    @classmethod
    def from_conf(cls, conf: cfg.ConfigOpts) -> LocationSettings:
        opts = conf.torrent_images
        return cls(
            tuple(opts.location_preference),
            opts.zone,
            tuple(opts.zone_caches),
            float(opts.location_stall_timeout),
            opts.state_dir,
            tuple(opts.location_file_prefixes),
            opts.location_min_rate * 1024,
        )


def discover(image: ImageInfo, settings: LocationSettings) -> list[Location]:
    """The image's readable locations and the host's zone caches, unranked."""
    found: list[Location] = []
    record = image.record
    listed = list(record.get("locations") or [])
    if record.get("direct_url"):
        listed.append({"url": record["direct_url"], "metadata": {}})
    for entry in listed:
        if not isinstance(entry, dict) or not isinstance(entry.get("url"), str):
            continue
        scheme = urllib.parse.urlsplit(entry["url"]).scheme
        kind = {"file": "file", "http": "http", "https": "http"}.get(scheme)
        if kind is None:
            continue  # rbd, swift, ...: not readable without Glance in the middle
        metadata = entry.get("metadata") or {}
        zone = metadata.get("zone") if isinstance(metadata, dict) else None
        found.append(Location(entry["url"], kind, zone))
    if settings.zone_caches:
        warn_zone_caches(settings.zone_caches)
    for cache in settings.zone_caches:
        url = f"{cache.rstrip('/')}/v2/images/{image.id}/file"
        found.append(Location(url, "http", settings.zone, origin="zone-cache"))
    return list({loc.url: loc for loc in found}.values())


class ThroughputStats:
    """MiB/s measured per location (an average that forgets), kept across restarts."""

    def __init__(self, state_dir: str) -> None:
        self.path = os.path.join(state_dir, "source-throughput.json")

    def load(self) -> dict[str, float]:
        try:
            with open(self.path) as f:
                data = json.load(f)
            return {str(k): float(v) for k, v in data.items()}
        except (OSError, ValueError, TypeError, AttributeError):
            return {}

    def record(self, key: str, nbytes: int, seconds: float) -> None:
        if seconds <= 0 or nbytes < units.Mi:
            return
        data = self.load()
        rate = nbytes / units.Mi / seconds
        data[key] = rate if key not in data else 0.7 * data[key] + 0.3 * rate
        utils.atomic_write(self.path, json.dumps(data, indent=1))


def rank(locations: list[Location], settings: LocationSettings) -> list[Location]:
    """Operator preference, then zone affinity, then measured throughput."""
    measured = ThroughputStats(settings.state_dir).load()

    def preference(loc: Location) -> int:
        for index, prefix in enumerate(settings.preference):
            if loc.url.startswith(prefix):
                return index
        return len(settings.preference)

    def affinity(loc: Location) -> int:
        return 0 if settings.zone and loc.zone == settings.zone else 1

    return sorted(
        locations, key=lambda loc: (preference(loc), affinity(loc), -measured.get(loc.key, 0.0))
    )


class LocationsSource:
    """Every readable location of the image, best first, as one source of the pipeline."""

    name = "locations"

    def __init__(self, settings: LocationSettings, *, verify_hash: bool) -> None:
        self.settings = settings
        self.verify_hash = verify_hash

    def available(self, image: ImageInfo) -> bool:
        return bool(discover(image, self.settings))

    def fetch_into(
        self, image: ImageInfo, slot: Slot, progress: ProgressCallback | None = None
    ) -> FetchResult:
        return fetch_from_locations(
            image, slot, self.settings, verify_hash=self.verify_hash, progress=progress
        )


def fetch_from_locations(
    image: ImageInfo,
    slot: Slot,
    settings: LocationSettings,
    *,
    verify_hash: bool,
    progress: ProgressCallback | None = None,
) -> FetchResult:
    """The image from its best location into ``slot``.

    Raises :class:`~nova_torrent_images.exception.LocationError` when every location
    failed (the slot is the caller's to abort;
    :class:`~nova_torrent_images.exception.NoLocations` when there was none to read), or
    ``IntegrityError`` when the bytes are not Glance's.
    """
    ranked = rank(discover(image, settings), settings)
    if not ranked:
        raise exception.NoLocations(image_id=image.id, location="", reason="Glance lists none")
    written = WrittenPrefix(image)
    stats = ThroughputStats(settings.state_dir)
    errors: list[str] = []
    started = time.monotonic()
    for location in ranked:
        reader = load_reader(location.kind)
        t0, before = time.monotonic(), written.offset
        try:
            reader.read_into(ReadRequest(image, slot, location, written, settings, progress))
        except exception.LocationError as exc:
            LOG.warning("%s; trying the next source", exc)
            errors.append(str(exc))
            continue
        except Exception as exc:  # noqa: BLE001  a reader's bug must not end the fetch
            LOG.exception("Image %s: reader %s failed on %s", image.id, location.kind, location.url)
            errors.append(f"{location.url}: unexpected {type(exc).__name__}: {exc}")
            continue
        finally:
            stats.record(location.key, written.offset - before, time.monotonic() - t0)
        verify.check_digest(
            image, written.offset, written.hasher.hexdigest() if verify_hash else None
        )
        LOG.info(
            "Image %s: %d MiB from %s %s in %.1fs%s, verified",
            image.id,
            image.size >> 20,
            location.origin,
            location.url,
            time.monotonic() - started,
            f" (continued at byte {before})" if before else "",
        )
        return FetchResult(
            image_id=image.id,
            destination=slot.path,
            source=location.origin,
            seconds=time.monotonic() - started,
            bytes_from_location=image.size,
            location=location.url,
        )
    raise exception.LocationError(
        image_id=image.id, location="every location", reason="; ".join(errors)
    )
