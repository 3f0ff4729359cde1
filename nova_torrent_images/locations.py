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

* ``file://`` on storage the host mounts (a shared filesystem store): copied (a reflink
  where the filesystem can) into the slot;
* ``http://``/``https://`` (a web store, a zone cache): read with ``Range`` requests,
  resumed where the last read stopped after a stall or a broken connection;
* zone caches configured per host (``[torrent_images] zone_caches``): an HTTP caching proxy
  in front of the Glance API, read as ``<cache>/v2/images/<id>/file``.

Sources are drivers loaded by name from the ``nova_torrent_images.sources`` entry points,
one per URL scheme. They are ranked by the operator's preference
(``location_preference``: URL prefixes, first wins), then by zone affinity (a location
whose metadata names ``[torrent_images] zone``), then by the throughput measured on earlier
fetches (``<state_dir>/source-throughput.json``). A failure or a stall moves to the next
one, continuing at the byte the last one reached; every byte is checked against Glance's
hash as it is written, as on the Glance path.
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import socket
import stat
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from oslo_config import cfg
from oslo_log import log as logging
from stevedore import driver

from nova_torrent_images import exception, utils, verify
from nova_torrent_images.image import ImageInfo
from nova_torrent_images.sources import FetchResult, ProgressCallback
from nova_torrent_images.stores.base import Slot

LOG = logging.getLogger(__name__)

NAMESPACE = "nova_torrent_images.sources"
CHUNK = 1024 * 1024
MiB = 1024 * 1024


class LocationError(exception.TorrentImagesError):
    msg_fmt = "Image %(image_id)s: location %(location)s failed: %(reason)s"


class NoLocations(LocationError):
    msg_fmt = "Image %(image_id)s: no location this host can read (%(reason)s)"


@dataclass
class Location:
    """One place the image's bytes can be read from."""

    url: str
    kind: str  # the source driver: "file" or "http"
    zone: str | None = None  # from the location's metadata
    origin: str = "location"  # "location" (Glance listed it) or "zone-cache" (configured)

    @property
    def key(self) -> str:
        """What throughput is remembered by: the URL without the image's own path."""
        parts = urllib.parse.urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc}" if parts.netloc else f"{parts.scheme}://"


class Resume:
    """Bytes already written in order, and the image hash over them: shared by sources."""

    def __init__(self, image: ImageInfo) -> None:
        self.image = image
        self.offset = 0
        self.hasher = image.new_hasher()

    def wrote(self, data: bytes) -> None:
        self.hasher.update(data)
        self.offset += len(data)

    def mark(self) -> tuple[int, Any]:
        """Where a source starts: :meth:`rewind` goes back there if it is refused."""
        return self.offset, self.hasher.copy()

    def rewind(self, mark: tuple[int, Any]) -> None:
        self.offset, self.hasher = mark[0], mark[1].copy()


def _open_slot(slot: Slot, offset: int):
    mode = "r+b" if slot.preallocated or os.path.exists(slot.path) else "wb"
    f = open(slot.path, mode)  # noqa: SIM115  closed by the caller
    f.seek(offset)
    if not slot.preallocated:
        f.truncate(offset)
    return f


def _copy(
    read: Callable[[int], bytes],
    slot: Slot,
    image: ImageInfo,
    resume: Resume,
    progress: ProgressCallback | None,
    pace: Callable[[int], None] | None = None,
) -> None:
    """Append what ``read`` gives to the slot from ``resume.offset``, up to the image size.

    ``pace(n)`` is told of every chunk read, and raises to abandon a slow source.
    """
    with _open_slot(slot, resume.offset) as out:
        while resume.offset < image.size:
            chunk = read(min(CHUNK, image.size - resume.offset))
            if not chunk:
                break
            out.write(chunk)
            resume.wrote(chunk)
            if pace is not None:
                pace(len(chunk))
            if progress is not None:
                progress(resume.offset, image.size, 0, 0)
        out.flush()
        os.fsync(out.fileno())


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix.rstrip("/") + "/")


class FileLocationSource:
    """A ``file://`` location on storage this host mounts (``location_file_prefixes``).

    Glance's record names the path, and whoever may add a location to an image chooses it:
    only regular files under the configured mounts are read, never through a symbolic link
    (the file actually opened is checked, so a link swapped in meanwhile is caught too).
    """

    kind = "file"

    def fetch_into(
        self,
        image: ImageInfo,
        slot: Slot,
        location: Location,
        resume: Resume,
        *,
        settings: LocationSettings,
        progress: ProgressCallback | None = None,
    ) -> int:
        def refuse(reason: str) -> LocationError:
            return LocationError(image_id=image.id, location=location.url, reason=reason)

        parts = urllib.parse.urlsplit(location.url)
        path = urllib.parse.unquote(parts.path)
        if parts.netloc not in ("", "localhost") or os.path.normpath(path) != path:
            raise refuse("it is not a plain absolute path on this host")
        prefixes = [os.path.normpath(p) for p in settings.file_prefixes if p.strip()]
        prefix = next((p for p in prefixes if _under(path, p)), None)
        if prefix is None:
            raise refuse(
                "it is outside [torrent_images] location_file_prefixes="
                f"{','.join(settings.file_prefixes) or '(none)'}"
            )
        # The real path of the file must be the one named, under the mount's real path:
        # no symbolic link anywhere below the prefix (the operator's mount may be one).
        expected = os.path.join(os.path.realpath(prefix), os.path.relpath(path, prefix))
        try:
            # O_NOFOLLOW: not a link itself; O_NONBLOCK: a FIFO does not hang the open.
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise refuse("it is a symbolic link; locations are read only as named") from exc
            raise refuse(str(exc)) from exc
        with os.fdopen(fd, "rb") as src:
            try:
                st = os.fstat(fd)
                opened = os.readlink(f"/proc/self/fd/{fd}")
            except OSError as exc:
                raise refuse(str(exc)) from exc
            if not stat.S_ISREG(st.st_mode):
                raise refuse("it is not a regular file (a device, a FIFO, a directory)")
            if opened != expected:
                raise refuse(f"it leads through a symbolic link to {opened}")
            if st.st_size != image.size:
                raise refuse(f"it holds {st.st_size} bytes, Glance says {image.size}")
            try:
                os.set_blocking(fd, True)
                src.seek(resume.offset)
                _copy(src.read, slot, image, resume, progress)
            except OSError as exc:
                raise refuse(str(exc)) from exc
        return image.size


class _Pace:
    """Abandons a source that sends less than ``min_rate`` bytes/s over any ``window``."""

    def __init__(self, min_rate: int, window: float, fail: Callable[[str], Exception]) -> None:
        self.min_rate, self.window, self._fail = min_rate, window, fail
        self._since, self._bytes = time.monotonic(), 0

    def __call__(self, n: int) -> None:
        self._bytes += n
        elapsed = time.monotonic() - self._since
        if elapsed < self.window:
            return
        if self._bytes < self.min_rate * elapsed:
            raise self._fail(
                f"it sent {self._bytes / elapsed / 1024:.0f} KiB/s over {elapsed:.1f}s, less "
                f"than [torrent_images] location_min_rate={self.min_rate // 1024}"
            )
        self._since, self._bytes = time.monotonic(), 0


class HTTPLocationSource:
    """An ``http(s)://`` location or zone cache, read with Range requests.

    Read where it is named or not at all: a redirect is refused (it could lead anywhere
    the host can reach). The headers must arrive within ``location_stall_timeout``, the
    body at ``location_min_rate`` at least, and the answer must be of exactly the range
    asked for; otherwise the next source continues where this one stopped (or, for an
    answer longer than the image, where it started).
    """

    kind = "http"

    def fetch_into(
        self,
        image: ImageInfo,
        slot: Slot,
        location: Location,
        resume: Resume,
        *,
        settings: LocationSettings,
        progress: ProgressCallback | None = None,
    ) -> int:
        def fail(reason: str) -> LocationError:
            return LocationError(image_id=image.id, location=location.url, reason=reason)

        mark = resume.mark()
        start = resume.offset
        parts = urllib.parse.urlsplit(location.url)
        connection_class = (
            http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        )
        # The socket timeout is the stall timeout: no byte for that long is a stall.
        conn = connection_class(parts.hostname, parts.port, timeout=settings.stall_timeout)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        late = threading.Event()
        try:
            conn.connect()
            # The whole header must come within the stall timeout, not a byte at a time.
            timer = threading.Timer(settings.stall_timeout, _cut, (conn, late))
            timer.start()
            try:
                conn.request("GET", target, headers={"Range": f"bytes={start}-{image.size - 1}"})
                response = conn.getresponse()
            finally:
                timer.cancel()
            if late.is_set():  # cut off: what came before the cut is no answer
                raise OSError("cut off")
            self._check_answer(response, start, image.size, fail)
            pace = None
            if settings.min_rate:
                pace = _Pace(settings.min_rate, settings.stall_timeout, fail)
            _copy(response.read1, slot, image, resume, progress, pace)
            if resume.offset == image.size and response.read1(1):
                resume.rewind(mark)
                raise fail(f"it sent more than the {image.size - start} bytes asked for")
        except (http.client.HTTPException, OSError, ValueError) as exc:
            if late.is_set():
                raise fail(
                    f"no complete answer within [torrent_images] location_stall_timeout="
                    f"{settings.stall_timeout:g}s"
                ) from exc
            raise fail(f"{exc} at byte {resume.offset}") from exc
        finally:
            conn.close()
        if resume.offset != image.size:
            raise fail(f"the body ended at byte {resume.offset} of {image.size}")
        return resume.offset - start

    @staticmethod
    def _check_answer(
        response: http.client.HTTPResponse,
        start: int,
        size: int,
        fail: Callable[[str], LocationError],
    ) -> None:
        """The answer is the range asked for, announced as such, or it is refused."""
        if 300 <= response.status < 400:
            raise fail(
                f"it redirects (HTTP {response.status}) to {response.getheader('Location')!r}; "
                "a location is read where Glance says it is, or not at all"
            )
        if response.status not in (200, 206) or (start and response.status != 206):
            raise fail(f"asked for bytes {start}- and got HTTP {response.status}")
        if response.status == 206:
            expected = f"bytes {start}-{size - 1}/{size}"
            got = (response.getheader("Content-Range") or "").strip()
            if got != expected:
                raise fail(f"it answered Content-Range {got!r}, not {expected!r}")
        length = response.getheader("Content-Length")
        if length is not None and length.strip() != str(size - start):
            raise fail(f"it announced {length} bytes, not the {size - start} asked for")


def _cut(conn: http.client.HTTPConnection, late: threading.Event) -> None:
    """Shut a connection whose answer is late (the reading thread then fails)."""
    late.set()
    sock = conn.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError as exc:  # closed meanwhile: the reader has already stopped
            LOG.debug("Late answer's connection already closed: %s", exc)


def load_source(kind: str) -> Any:
    return driver.DriverManager(NAMESPACE, kind, invoke_on_load=True).driver


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
        if seconds <= 0 or nbytes < MiB:
            return
        data = self.load()
        rate = nbytes / MiB / seconds
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

    Raises :class:`LocationError` when every location failed (the slot is the caller's
    to abort; :class:`NoLocations` when there was none to read), or ``IntegrityError``
    when the bytes are not Glance's.
    """
    ranked = rank(discover(image, settings), settings)
    if not ranked:
        raise NoLocations(image_id=image.id, location="", reason="Glance lists none")
    resume = Resume(image)
    stats = ThroughputStats(settings.state_dir)
    errors: list[str] = []
    started = time.monotonic()
    for location in ranked:
        source = load_source(location.kind)
        t0, before = time.monotonic(), resume.offset
        try:
            source.fetch_into(
                image,
                slot,
                location,
                resume,
                settings=settings,
                progress=progress,
            )
        except LocationError as exc:
            LOG.warning("%s; trying the next source", exc)
            errors.append(str(exc))
            continue
        finally:
            stats.record(location.key, resume.offset - before, time.monotonic() - t0)
        verify.check_digest(
            image, resume.offset, resume.hasher.hexdigest() if verify_hash else None
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
    raise LocationError(image_id=image.id, location="every location", reason="; ".join(errors))
