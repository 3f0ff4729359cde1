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
"""Location readers: how a host reads an image location itself, one reader per URL scheme.

* ``file://`` on storage the host mounts (a shared filesystem store): copied into the slot;
* ``http://``/``https://`` (a web store, a deprecated ``zone_caches`` proxy; no token is
  sent): read with ``Range`` requests, continued where the last read stopped after a stall
  or a broken connection.

Readers are drivers loaded by name from the ``nova_torrent_images.location_readers`` entry
points (the former group name ``nova_torrent_images.sources`` is still read). The source
that ranks locations and moves between them is :mod:`.locations`.
"""

from __future__ import annotations

import abc
import errno
import http.client
import os
import socket
import stat
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from oslo_log import log as logging
from oslo_utils import units
from stevedore import driver
from stevedore import exception as stevedore_exc

from nova_torrent_images import exception
from nova_torrent_images.common import utils
from nova_torrent_images.compute.sources.base import ProgressCallback
from nova_torrent_images.compute.stores.base import Slot
from nova_torrent_images.glance.image import ImageInfo

if TYPE_CHECKING:
    from nova_torrent_images.compute.sources.locations import LocationSettings

LOG = logging.getLogger(__name__)

NAMESPACE = "nova_torrent_images.location_readers"
FORMER_NAMESPACE = "nova_torrent_images.sources"
CHUNK = units.Mi


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


class WrittenPrefix:
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


@dataclass
class ReadRequest:
    """What a reader is asked: the image into the slot from one location, where it got to."""

    image: ImageInfo
    slot: Slot
    location: Location
    written: WrittenPrefix
    settings: LocationSettings
    progress: ProgressCallback | None = None

    def refuse(self, reason: str) -> exception.LocationError:
        """The typed refusal of this location, for the next one to continue."""
        return exception.LocationError(
            image_id=self.image.id, location=self.location.url, reason=reason
        )


class LocationReader(abc.ABC):
    """Reads one kind of location (a URL scheme); loaded by name from the entry points."""

    kind: str

    @abc.abstractmethod
    def read_into(self, request: ReadRequest) -> int:
        """Append the image from ``request.written.offset`` to the slot; the bytes read.

        Every failure is a :class:`~nova_torrent_images.exception.LocationError`
        (``request.refuse``: the next location continues at ``written.offset``);
        ``request.written`` is updated as bytes land.
        """


class _FormerReader(LocationReader):
    """A reader written to the former contract (``fetch_into``), from the former group."""

    def __init__(self, reader: Any) -> None:
        self.reader = reader
        self.kind = getattr(reader, "kind", "?")

    def read_into(self, request: ReadRequest) -> int:
        return self.reader.fetch_into(
            request.image,
            request.slot,
            request.location,
            request.written,  # the former Resume: the same offset, hasher, mark, rewind
            settings=request.settings,
            progress=request.progress,
        )


def load_reader(kind: str) -> LocationReader:
    """The reader of ``kind`` (``file``, ``http``, or another package's)."""
    for namespace in (NAMESPACE, FORMER_NAMESPACE):
        try:
            reader: Any = driver.DriverManager(namespace, kind, invoke_on_load=True).driver
        except stevedore_exc.NoMatches:
            continue
        return reader if hasattr(reader, "read_into") else _FormerReader(reader)
    raise stevedore_exc.NoMatches(f"no location reader {kind!r} in {NAMESPACE}")


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
    written: WrittenPrefix,
    progress: ProgressCallback | None,
    pace: Callable[[int], None] | None = None,
) -> None:
    """Append what ``read`` gives to the slot from ``written.offset``, up to the image size.

    ``pace(n)`` is told of every chunk read, and raises to abandon a slow source.
    """
    with _open_slot(slot, written.offset) as out:
        while written.offset < image.size:
            chunk = read(min(CHUNK, image.size - written.offset))
            if not chunk:
                break
            out.write(chunk)
            written.wrote(chunk)
            if pace is not None:
                pace(len(chunk))
            if progress is not None:
                progress(written.offset, image.size, 0, 0)
        out.flush()
        utils.fsync(out.fileno())


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix.rstrip("/") + "/")


class FileLocationReader(LocationReader):
    """A ``file://`` location on storage this host mounts (``location_file_prefixes``).

    Glance's record names the path, and whoever may add a location to an image chooses it:
    only regular files under the configured mounts are read, never through a symbolic link
    (the file actually opened is checked, so a link swapped in meanwhile is caught too).
    """

    kind = "file"

    def read_into(self, request: ReadRequest) -> int:
        image, slot, written = request.image, request.slot, request.written
        location, settings, progress = request.location, request.settings, request.progress
        refuse = request.refuse
        parts = urllib.parse.urlsplit(location.url)
        path = urllib.parse.unquote(parts.path)
        if "\0" in path:  # os.open would raise ValueError, not a refusal
            raise refuse("its path holds a NUL byte")
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
        try:
            # Checked on the descriptor before it becomes a file object: io refuses a
            # directory's descriptor with IsADirectoryError, which is no refusal.
            st = os.fstat(fd)
            opened = os.readlink(f"/proc/self/fd/{fd}")
            if not stat.S_ISREG(st.st_mode):
                raise refuse("it is not a regular file (a device, a FIFO, a directory)")
            if opened != expected:
                raise refuse(f"it leads through a symbolic link to {opened}")
            if st.st_size != image.size:
                raise refuse(f"it holds {st.st_size} bytes, Glance says {image.size}")
            os.set_blocking(fd, True)
            src = os.fdopen(fd, "rb")
        except BaseException as exc:
            os.close(fd)
            if isinstance(exc, OSError):
                raise refuse(str(exc)) from exc
            raise
        with src:
            try:
                src.seek(written.offset)
                _copy(src.read, slot, image, written, progress)
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


class HTTPLocationReader(LocationReader):
    """An ``http(s)://`` location or zone cache, read with Range requests.

    Read where it is named or not at all: a redirect is refused (it could lead anywhere
    the host can reach). The headers must arrive within ``location_stall_timeout``, the
    body at ``location_min_rate`` at least, and the answer must be of exactly the range
    asked for; otherwise the next source continues where this one stopped (or, for an
    answer longer than the image, where it started).
    """

    kind = "http"

    def read_into(self, request: ReadRequest) -> int:
        image, slot, written = request.image, request.slot, request.written
        location, settings, progress = request.location, request.settings, request.progress
        fail = request.refuse
        mark = written.mark()
        start = written.offset
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
            _copy(response.read1, slot, image, written, progress, pace)
            if written.offset == image.size and response.read1(1):
                written.rewind(mark)
                raise fail(f"it sent more than the {image.size - start} bytes asked for")
        except (http.client.HTTPException, OSError, ValueError) as exc:
            if late.is_set():
                raise fail(
                    f"no complete answer within [torrent_images] location_stall_timeout="
                    f"{settings.stall_timeout:g}s"
                ) from exc
            raise fail(f"{exc} at byte {written.offset}") from exc
        finally:
            conn.close()
        if written.offset != image.size:
            raise fail(f"the body ended at byte {written.offset} of {image.size}")
        return written.offset - start

    @staticmethod
    def _check_answer(
        response: http.client.HTTPResponse,
        start: int,
        size: int,
        fail: Callable[[str], exception.LocationError],
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
