"""Publishing: a Glance image becomes a torrent the origin seeder serves.

``publish`` reads the image from Glance once (a verified download), builds a hybrid v1+v2
torrent of it named by the image id, keeps both in the registry, adds the info-hashes to
the tracker whitelist and only then sets ``torrent_magnet`` and ``is_torrentable=true`` on
the image, so a host that sees the magnet finds a registry entry the seeder picks up within
a second. The magnet names the trackers (``tr=``) and the origin seeders (``x.pe=``) and
never a web seed: compute hosts must not pull from Glance over HTTP through the swarm.

The registry (``[torrent_images] origin_state_dir``) is the origin's only state::

    images/<image id>/image.torrent   the .torrent (bencoded, with the v2 piece layers)
    images/<image id>/meta.json       sidecar: hashes, size, Glance hash, magnet, ...
    images/<image id>/<image id>      the image data (or <origin_data_dir>/<image id>)
    images/.staging-*                 an unfinished publish (ignored, removed later)
    locks/                            oslo.concurrency file locks (one per image id)

An entry appears by renaming a complete staging directory into place, with the sidecar
written last, so a crash never leaves a half entry the seeder could pick up.

Publishing is idempotent: when the registry entry matches Glance's record (same size and
``os_hash_value``) and the image already carries the same magnet and
``is_torrentable=true``, nothing is written anywhere and Glance is not updated.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from oslo_concurrency import lockutils
from oslo_config import cfg
from oslo_log import log as logging

from nova_torrent_images import exception
from nova_torrent_images.glance import GlanceClient
from nova_torrent_images.image import ImageInfo, parse_image
from nova_torrent_images.origin.tracker import TrackerWhitelist, tracker_hashes
from nova_torrent_images.swarm.torrent import (
    MAGNET_MAX_LENGTH,
    build_magnet,
    make_torrent,
    parse_magnet,
)

LOG = logging.getLogger(__name__)

PUBLISHABLE_DISK_FORMATS = ("raw",)
SIDECAR = "meta.json"
TORRENT_FILE = "image.torrent"
SIDECAR_VERSION = 1
_IMAGE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,254}$")


def validate_image_id(image_id: str) -> str:
    """Return ``image_id`` if it is safe as a file name (Glance ids are UUIDs)."""
    if not isinstance(image_id, str) or not _IMAGE_ID.match(image_id):
        raise exception.NotPublishable(
            image_id=image_id, reason="it is not a valid image id (letters, digits, - and _)"
        )
    return image_id


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class PublishedImage:
    """A registry entry: what was published and where its files are."""

    image_id: str
    size: int
    hash_algo: str
    hash_value: str
    info_hash_v1: str | None
    info_hash_v2: str | None
    piece_length: int
    num_pieces: int
    magnet: str = ""
    name: str | None = None
    checksum: str | None = None
    glance_updated_at: str | None = None
    published_at: str = ""
    # Whether publish set is_torrentable=true (unpublish then removes it again).
    set_torrentable: bool = False
    dropped_from_magnet: list[str] = field(default_factory=list)
    # Where the files are; not stored in the sidecar.
    directory: str = field(default="", compare=False, repr=False)
    data_path: str = field(default="", compare=False, repr=False)

    _STORED = (
        "image_id",
        "size",
        "hash_algo",
        "hash_value",
        "info_hash_v1",
        "info_hash_v2",
        "piece_length",
        "num_pieces",
        "magnet",
        "name",
        "checksum",
        "glance_updated_at",
        "published_at",
        "set_torrentable",
        "dropped_from_magnet",
    )

    @property
    def torrent_path(self) -> str:
        return os.path.join(self.directory, TORRENT_FILE)

    @property
    def tracker_hashes(self) -> list[str]:
        return tracker_hashes(self.info_hash_v1, self.info_hash_v2)

    def to_json(self) -> str:
        data = {name: getattr(self, name) for name in self._STORED}
        data["version"] = SIDECAR_VERSION
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, directory: str, data_path: str) -> PublishedImage:
        data = json.loads(text)
        if data.get("version") != SIDECAR_VERSION:
            raise ValueError(f"unknown sidecar version {data.get('version')!r}")
        kwargs = {name: data[name] for name in cls._STORED if name in data}
        return cls(**kwargs, directory=directory, data_path=data_path)

    def image_info(self) -> ImageInfo:
        """What verification needs, from the sidecar (the Glance record at publish time)."""
        return ImageInfo(
            id=self.image_id,
            name=self.name,
            status="active",
            size=self.size,
            disk_format="raw",
            container_format=None,
            hash_algo=self.hash_algo,
            hash_value=self.hash_value,
            is_torrentable=True,
            magnet=None,
            magnet_uri=None,
        )

    def has_data(self) -> bool:
        try:
            return os.path.getsize(self.data_path) == self.size
        except OSError:
            return False

    def matches(self, image: ImageInfo) -> bool:
        """Whether Glance's record still describes the bytes that were published."""
        return (
            image.size == self.size
            and image.hash_algo == self.hash_algo
            and image.hash_value == self.hash_value
        )

    def named_by(self, magnet_uri: str | None) -> bool:
        """Whether ``magnet_uri`` names this torrent (by either info-hash)."""
        if not magnet_uri:
            return False
        try:
            magnet = parse_magnet(magnet_uri)
        except ValueError:
            return False
        return bool(
            (magnet.info_hash_v2 and magnet.info_hash_v2 == self.info_hash_v2)
            or (magnet.info_hash_v1 and magnet.info_hash_v1 == self.info_hash_v1)
        )


@dataclass
class Staging:
    """An unfinished registry entry, invisible to the seeder until committed."""

    image_id: str
    directory: str
    data_path: str


class Registry:
    """The origin's on-disk registry of published images (see the module docstring)."""

    def __init__(self, state_dir: str, data_dir: str | None = None) -> None:
        self.state_dir = os.path.abspath(state_dir)
        self.images_dir = os.path.join(self.state_dir, "images")
        self.lock_dir = os.path.join(self.state_dir, "locks")
        self.data_dir = os.path.abspath(data_dir) if data_dir else None

    def ensure(self) -> Registry:
        dirs = [self.images_dir, self.lock_dir] + ([self.data_dir] if self.data_dir else [])
        try:
            for d in dirs:
                os.makedirs(d, exist_ok=True)
        except OSError as exc:
            raise exception.RegistryError(path=self.state_dir, reason=str(exc)) from exc
        return self

    # -- paths -------------------------------------------------------------------------
    def entry_dir(self, image_id: str) -> str:
        return os.path.join(self.images_dir, validate_image_id(image_id))

    def data_path(self, image_id: str) -> str:
        base = self.data_dir or self.entry_dir(image_id)
        return os.path.join(base, validate_image_id(image_id))

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """A lock shared by every process using this registry (publish, seeder, CLI)."""
        self.ensure()
        with lockutils.lock(f"nti-origin-{name}", external=True, lock_path=self.lock_dir):
            yield

    # -- reading -----------------------------------------------------------------------
    def get(self, image_id: str) -> PublishedImage | None:
        directory = self.entry_dir(image_id)
        path = os.path.join(directory, SIDECAR)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise exception.RegistryError(path=path, reason=str(exc)) from exc
        try:
            return PublishedImage.from_json(text, directory, self.data_path(image_id))
        except (ValueError, TypeError, KeyError) as exc:
            LOG.error("Registry entry %s is unreadable (%s); treating it as unpublished", path, exc)
            return None

    def list(self) -> list[PublishedImage]:
        entries = []
        try:
            names = sorted(os.listdir(self.images_dir))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise exception.RegistryError(path=self.images_dir, reason=str(exc)) from exc
        for name in names:
            if name.startswith(".") or not _IMAGE_ID.match(name):
                continue
            entry = self.get(name)
            if entry is not None:
                entries.append(entry)
        return entries

    def signature(self) -> tuple:
        """Changes whenever an entry appears, goes or has its sidecar rewritten (cheap)."""
        try:
            with os.scandir(self.images_dir) as it:
                names = sorted(e.name for e in it if not e.name.startswith("."))
        except FileNotFoundError:
            return ()
        sig = []
        for name in names:
            try:
                sig.append(
                    (name, os.stat(os.path.join(self.images_dir, name, SIDECAR)).st_mtime_ns)
                )
            except OSError:
                sig.append((name, None))
        return tuple(sig)

    def read_torrent(self, entry: PublishedImage) -> bytes:
        try:
            with open(entry.torrent_path, "rb") as f:
                return f.read()
        except OSError as exc:
            raise exception.RegistryError(path=entry.torrent_path, reason=str(exc)) from exc

    # -- writing -----------------------------------------------------------------------
    def stage(self, image_id: str) -> Staging:
        self.ensure()
        directory = tempfile.mkdtemp(prefix=f".staging-{image_id}-", dir=self.images_dir)
        os.chmod(directory, 0o755)
        if self.data_dir:
            data_path = os.path.join(self.data_dir, f".staging-{os.path.basename(directory)}")
        else:
            data_path = os.path.join(directory, image_id)
        return Staging(image_id, directory, data_path)

    def commit(self, staging: Staging, entry: PublishedImage) -> PublishedImage:
        """Move a complete staging entry into place (replacing an older entry)."""
        target = self.entry_dir(staging.image_id)
        data_target = self.data_path(staging.image_id)
        try:
            _write_atomic(os.path.join(staging.directory, SIDECAR), entry.to_json())
            if self.data_dir:
                os.replace(staging.data_path, data_target)
            if os.path.exists(target):
                self._discard_dir(target)
            os.rename(staging.directory, target)
        except OSError as exc:
            raise exception.RegistryError(path=target, reason=str(exc)) from exc
        _fsync_dir(self.images_dir)
        return dataclasses.replace(entry, directory=target, data_path=data_target)

    def abort(self, staging: Staging) -> None:
        self._discard_dir(staging.directory)
        if self.data_dir:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staging.data_path)

    def save(self, entry: PublishedImage) -> None:
        """Rewrite an entry's sidecar (its magnet or flags changed)."""
        path = os.path.join(entry.directory, SIDECAR)
        try:
            _write_atomic(path, entry.to_json())
        except OSError as exc:
            raise exception.RegistryError(path=path, reason=str(exc)) from exc

    def remove(self, image_id: str) -> PublishedImage | None:
        entry = self.get(image_id)
        directory = self.entry_dir(image_id)
        if os.path.exists(directory):
            self._discard_dir(directory)
        if self.data_dir:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.data_path(image_id))
        return entry

    def cleanup_staging(self, older_than: float = 3600.0) -> None:
        """Remove leftovers of publishes that died (staging older than ``older_than`` s)."""
        now = time.time()
        for base in filter(None, (self.images_dir, self.data_dir)):
            try:
                names = os.listdir(base)
            except OSError:
                continue
            for name in names:
                if not name.startswith((".staging-", ".trash-")):
                    continue
                path = os.path.join(base, name)
                try:
                    if now - os.lstat(path).st_mtime < older_than:
                        continue
                except OSError:
                    continue
                LOG.info("Removing the leftover of an interrupted publish: %s", path)
                if os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        os.unlink(path)

    def _discard_dir(self, directory: str) -> None:
        # Rename first: the entry vanishes at once even if removing big data takes time.
        trash = os.path.join(
            self.images_dir, f".trash-{os.path.basename(directory)}-{os.getpid()}-{time.time_ns()}"
        )
        try:
            os.rename(directory, trash)
        except FileNotFoundError:
            return
        except OSError as exc:
            LOG.warning("Cannot move %s aside (%s); removing it in place", directory, exc)
            trash = directory
        shutil.rmtree(trash, ignore_errors=True)


def _write_atomic(path: str, text: str) -> None:
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        LOG.debug("fsync of directory %s failed", path, exc_info=True)
    finally:
        os.close(fd)


# -- magnets ---------------------------------------------------------------------------


def parse_host_port(value: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port); raise ValueError when malformed."""
    host, sep, port_text = value.strip().rpartition(":")
    if not sep or not host:
        raise ValueError(f"{value!r} is not host:port")
    host = host.strip("[]")
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", host):
            raise ValueError(f"{value!r} has an invalid host") from None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{value!r} has an invalid port")
    return host, int(port_text)


def _format_peer(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def fit_magnet(
    *,
    image_id: str,
    info_hash_v1: str | None,
    info_hash_v2: str | None,
    trackers: Sequence[str] = (),
    peers: Sequence[tuple[str, int]] = (),
    max_length: int = MAGNET_MAX_LENGTH,
) -> tuple[str, list[str]]:
    """The magnet of a published image, shortened to ``max_length``; and what was dropped.

    Glance keeps at most 255 characters in a property. Parts are dropped in this order
    until the magnet fits, least useful first:

    1. ``dn`` (the name: hosts name the torrent after the image id anyway);
    2. the v1 info-hash (``urn:btih``): the v2 hash alone identifies the hybrid torrent,
       is the stronger hash (SHA-256), and libtorrent 2.x hosts fetch a hybrid torrent
       from it; the tracker whitelist carries the truncated v2 hash for such hosts;
    3. peer hints (``x.pe``) after the first, last first: peer exchange spreads the rest;
    4. trackers after the first, last first;
    5. the last peer hint, when a tracker remains (the origin seeder announces to it).

    Raises :class:`MagnetTooLong` if even that does not fit.
    """
    name: str | None = image_id
    v1 = info_hash_v1
    trackers, peers = list(trackers), list(peers)
    dropped: list[str] = []

    def build() -> str:
        return build_magnet(
            info_hash_v1=v1,
            info_hash_v2=info_hash_v2,
            name=name,
            trackers=trackers,
            peers=peers,
            max_length=None,
        )

    uri = build()
    if len(uri) > max_length and name:
        dropped.append(f"dn={name}")
        name = None
        uri = build()
    if len(uri) > max_length and v1 and info_hash_v2:
        dropped.append(f"xt=urn:btih:{v1}")
        v1 = None
        uri = build()
    while len(uri) > max_length and len(peers) > 1:
        dropped.append("x.pe=" + _format_peer(*peers.pop()))
        uri = build()
    while len(uri) > max_length and len(trackers) > 1:
        dropped.append("tr=" + trackers.pop())
        uri = build()
    if len(uri) > max_length and trackers and peers:
        dropped.append("x.pe=" + _format_peer(*peers.pop()))
        uri = build()
    if len(uri) > max_length:
        raise exception.MagnetTooLong(image_id=image_id, length=len(uri), limit=max_length)
    return uri, dropped


# -- publishing ------------------------------------------------------------------------


@dataclass
class PublishResult:
    """What a publish did."""

    image_id: str
    status: str  # "published", "updated" (Glance properties fixed) or "unchanged"
    magnet: str
    info_hash_v1: str | None
    info_hash_v2: str | None
    size: int
    seconds: float
    bytes_from_glance: int = 0
    dropped_from_magnet: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return self.status != "unchanged"


@dataclass
class UnpublishResult:
    image_id: str
    was_published: bool
    glance_updated: bool
    reason: str


class Publisher:
    """Publish and unpublish Glance images on an origin node."""

    def __init__(
        self,
        conf: cfg.ConfigOpts,
        glance: GlanceClient,
        *,
        registry: Registry | None = None,
        whitelist: TrackerWhitelist | None = None,
    ) -> None:
        self.conf = conf
        self.opts = conf.torrent_images
        self.glance = glance
        self.registry = registry or Registry(self.opts.origin_state_dir, self.opts.origin_data_dir)
        if whitelist is None and self.opts.tracker_whitelist_path:
            whitelist = TrackerWhitelist(
                self.opts.tracker_whitelist_path, self.opts.tracker_pidfile
            )
        self.whitelist = whitelist

    @classmethod
    def from_conf(cls, conf: cfg.ConfigOpts) -> Publisher:
        return cls(conf, GlanceClient.from_conf(conf))

    # -- configuration -----------------------------------------------------------------
    def advertise_peers(self) -> list[tuple[str, int]]:
        """The origin seeder addresses for ``x.pe`` (configured, or the listen address)."""
        configured = [a for a in self.opts.origin_advertise_addresses if a.strip()]
        option = "origin_advertise_addresses"
        if not configured:
            listen = [i for i in self.opts.listen_interfaces if i.strip()]
            host = listen[0].rpartition(":")[0].strip("[]") if len(listen) == 1 else ""
            if host in ("", "0.0.0.0", "::"):
                return []
            configured, option = listen, "listen_interfaces"
        peers = []
        for value in configured:
            try:
                peers.append(parse_host_port(value))
            except ValueError as exc:
                raise exception.ConfigError(option=option, reason=str(exc)) from None
        return peers

    def trackers(self) -> list[str]:
        return [t.strip() for t in self.opts.origin_trackers if t.strip()]

    def magnet_for(self, entry: PublishedImage) -> tuple[str, list[str]]:
        trackers, peers = self.trackers(), self.advertise_peers()
        if not trackers and not peers:
            raise exception.ConfigError(
                option="origin_advertise_addresses",
                reason="the magnet would name neither a tracker nor an origin seeder, so no "
                "host could find the swarm; set origin_advertise_addresses (host:port of "
                "the origin seeders) and/or origin_trackers",
            )
        try:
            return fit_magnet(
                image_id=entry.image_id,
                info_hash_v1=entry.info_hash_v1,
                info_hash_v2=entry.info_hash_v2,
                trackers=trackers,
                peers=peers,
            )
        except ValueError as exc:  # MagnetError: a tracker URL that does not parse back
            raise exception.ConfigError(option="origin_trackers", reason=str(exc)) from exc

    # -- publish -----------------------------------------------------------------------
    def _require_publishable(self, image: ImageInfo) -> None:
        if image.status != "active":
            raise exception.NotPublishable(
                image_id=image.id,
                reason=f"it is {image.status}, not active (only images with uploaded data "
                "can be published)",
            )
        if image.disk_format not in PUBLISHABLE_DISK_FORMATS:
            raise exception.NotPublishable(
                image_id=image.id,
                reason=f"its disk format is {image.disk_format}; only raw images are "
                "published (compute hosts write the pieces straight into the destination, "
                "which needs the bytes Nova boots)",
            )
        try:
            image.require_verifiable()
        except exception.InvalidImageMetadata as exc:
            raise exception.NotPublishable(image_id=image.id, reason=str(exc)) from exc

    def _image_info(self, image_id: str) -> ImageInfo:
        return self._parse(self.glance.get_image(image_id))

    def _parse(self, record: dict[str, Any]) -> ImageInfo:
        return parse_image(
            record,
            torrentable_property=self.opts.torrentable_property,
            magnet_property=self.opts.magnet_property,
        )

    def publish(self, image_id: str) -> PublishResult:
        """Publish ``image_id``; a no-op when it is published and unchanged.

        Raises :class:`ImageNotFound`, :class:`NotPublishable` (not active, not raw, no
        hash) before changing anything; :class:`GlanceError`, :class:`RegistryError`,
        :class:`TrackerError` or :class:`ConfigError` otherwise, after undoing its own
        changes.
        """
        validate_image_id(image_id)
        start = time.monotonic()
        with self.registry.lock(image_id):
            record = self.glance.get_image(image_id)
            image = self._parse(record)
            self._require_publishable(image)
            entry = self.registry.get(image_id)
            if entry is not None and not entry.matches(image):
                LOG.warning(
                    "Image %s changed in Glance since it was published (size %s -> %s, %s "
                    "%s -> %s); publishing it again",
                    image_id,
                    entry.size,
                    image.size,
                    image.hash_algo,
                    entry.hash_value[:16],
                    (image.hash_value or "")[:16],
                )
                self.registry.remove(image_id)
                entry = None
            elif entry is not None and not entry.has_data():
                LOG.warning(
                    "Image %s: the published data %s is missing or truncated; reading "
                    "the image from Glance again",
                    image_id,
                    entry.data_path,
                )
                self.registry.remove(image_id)
                entry = None
            created = entry is None
            read = 0
            if created:
                # Settings problems (no tracker nor hint, a magnet that cannot fit) show
                # before the image is read: the hashes' lengths are all that matter.
                self.magnet_for(PublishedImage(image_id, 0, "", "", "0" * 40, "0" * 64, 0, 0))
                entry = self._create(image, record)
                read = entry.size
            try:
                return self._advertise(image, entry, created, read, start)
            except BaseException:
                if created:
                    LOG.warning("Image %s: undoing the publish after an error", image_id)
                    self.registry.remove(image_id)
                    self._sync_whitelist(raise_errors=False)
                raise

    def _create(self, image: ImageInfo, record: dict[str, Any]) -> PublishedImage:
        staging = self.registry.stage(image.id)
        try:
            LOG.info(
                "Image %s: reading %d MiB from Glance to publish it", image.id, image.size >> 20
            )
            self.glance.download(image, staging.data_path)
            torrent = make_torrent(staging.data_path, name=image.id)
            if torrent.size != image.size:
                raise exception.PublishError(
                    image_id=image.id,
                    reason=f"the torrent covers {torrent.size} bytes, Glance says {image.size}",
                )
            with open(os.path.join(staging.directory, TORRENT_FILE), "wb") as f:
                f.write(torrent.data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(staging.data_path, 0o644)
            entry = PublishedImage(
                image_id=image.id,
                size=image.size,
                hash_algo=image.hash_algo,
                hash_value=image.hash_value,
                info_hash_v1=torrent.info_hash_v1,
                info_hash_v2=torrent.info_hash_v2,
                piece_length=torrent.piece_length,
                num_pieces=torrent.num_pieces,
                name=image.name,
                checksum=record.get("checksum"),
                glance_updated_at=record.get("updated_at"),
                published_at=_now(),
            )
            return self.registry.commit(staging, entry)
        except BaseException:
            self.registry.abort(staging)
            raise

    def _advertise(
        self, image: ImageInfo, entry: PublishedImage, created: bool, read: int, start: float
    ) -> PublishResult:
        magnet, dropped = self.magnet_for(entry)
        if dropped:
            LOG.warning(
                "Image %s: the magnet had to be shortened to fit Glance's %d characters; "
                "dropped %s",
                image.id,
                MAGNET_MAX_LENGTH,
                ", ".join(dropped),
            )
        self._sync_whitelist()
        props: dict[str, str] = {}
        if image.magnet_uri != magnet:
            props[self.opts.magnet_property] = magnet
        set_torrentable = entry.set_torrentable
        if image.is_torrentable is not True:
            props[self.opts.torrentable_property] = "true"
            set_torrentable = True
        if props:
            self.glance.set_properties(image.id, **props)
            LOG.info("Image %s: set %s in Glance", image.id, ", ".join(sorted(props)))
        if (entry.magnet, entry.set_torrentable, entry.dropped_from_magnet) != (
            magnet,
            set_torrentable,
            dropped,
        ):
            entry = dataclasses.replace(
                entry, magnet=magnet, set_torrentable=set_torrentable, dropped_from_magnet=dropped
            )
            self.registry.save(entry)
        status = "published" if created else ("updated" if props else "unchanged")
        seconds = time.monotonic() - start
        LOG.info(
            "Image %s: %s (%d MiB, %d pieces of %d KiB, v2 %s) in %.1fs: %s",
            image.id,
            status,
            entry.size >> 20,
            entry.num_pieces,
            entry.piece_length >> 10,
            entry.info_hash_v2,
            seconds,
            magnet,
        )
        return PublishResult(
            image_id=image.id,
            status=status,
            magnet=magnet,
            info_hash_v1=entry.info_hash_v1,
            info_hash_v2=entry.info_hash_v2,
            size=entry.size,
            seconds=seconds,
            bytes_from_glance=read,
            dropped_from_magnet=dropped,
        )

    # -- unpublish ---------------------------------------------------------------------
    def unpublish(
        self, image_id: str, *, reason: str = "unpublish requested", update_glance: bool = True
    ) -> UnpublishResult:
        """Stop publishing ``image_id``: Glance properties, registry entry, whitelist.

        Glance is updated first (hosts stop joining the swarm), then the entry and its
        data are removed and the whitelist is rewritten. An image that is not published
        is not an error; a ``torrent_magnet`` left in Glance is removed anyway.
        """
        validate_image_id(image_id)
        with self.registry.lock(image_id):
            return self._unpublish_locked(image_id, reason, update_glance)

    def _unpublish_locked(self, image_id: str, reason: str, update_glance: bool) -> UnpublishResult:
        entry = self.registry.get(image_id)
        glance_updated = False
        if update_glance:
            glance_updated = self._remove_glance_properties(image_id, entry)
        if entry is not None or os.path.exists(self.registry.entry_dir(image_id)):
            self.registry.remove(image_id)
        self._sync_whitelist()
        if entry is not None:
            LOG.info("Image %s unpublished: %s", image_id, reason)
        else:
            LOG.info("Image %s was not published here (%s)", image_id, reason)
        return UnpublishResult(image_id, entry is not None, glance_updated, reason)

    def _remove_glance_properties(self, image_id: str, entry: PublishedImage | None) -> bool:
        try:
            image = self._image_info(image_id)
        except exception.ImageNotFound:
            return False
        remove = []
        if image.magnet_uri is not None and (entry is None or entry.named_by(image.magnet_uri)):
            remove.append(self.opts.magnet_property)
        if entry is not None and entry.set_torrentable and image.is_torrentable is True:
            remove.append(self.opts.torrentable_property)
        if not remove:
            return False
        self.glance.remove_properties(image_id, remove)
        LOG.info("Image %s: removed %s from Glance", image_id, ", ".join(remove))
        return True

    # -- listing and checks ------------------------------------------------------------
    def published(self) -> list[PublishedImage]:
        return self.registry.list()

    def stale_reason(self, entry: PublishedImage) -> tuple[str, bool] | None:
        """Why ``entry`` should no longer be published, and whether Glance needs fixing.

        ``None`` when it is fine, or when Glance could not be asked (a Glance outage must
        not unpublish everything).
        """
        try:
            image = self._image_info(entry.image_id)
        except exception.ImageNotFound:
            return "it was deleted from Glance", False
        except exception.InvalidImageMetadata as exc:
            return f"its Glance record is no longer usable: {exc}", True
        except exception.TorrentImagesError as exc:
            LOG.warning(
                "Image %s: cannot check it in Glance, still seeding: %s", entry.image_id, exc
            )
            return None
        if image.status != "active":
            return f"it is {image.status} in Glance", True
        if not entry.matches(image):
            return "it was replaced in Glance (its size or hash changed)", True
        if not entry.named_by(image.magnet_uri):
            return (
                f"its {self.opts.magnet_property} property no longer names the published torrent",
                False,
            )
        return None

    def check(self) -> list[UnpublishResult]:
        """Unpublish every entry that Glance no longer backs (the seeder's periodic check)."""
        results = []
        for entry in self.registry.list():
            with self.registry.lock(entry.image_id):
                current = self.registry.get(entry.image_id)
                if current is None:
                    continue
                stale = self.stale_reason(current)
                if stale is None:
                    continue
                reason, fix_glance = stale
                LOG.warning("Image %s is unpublished: %s", entry.image_id, reason)
                try:
                    results.append(self._unpublish_locked(entry.image_id, reason, fix_glance))
                except exception.TorrentImagesError as exc:
                    LOG.error("Image %s: unpublishing failed: %s", entry.image_id, exc)
        self.registry.cleanup_staging()
        return results

    def _sync_whitelist(self, *, raise_errors: bool = True) -> bool:
        if self.whitelist is None:
            return False
        with self.registry.lock("whitelist"):
            hashes = [h for e in self.registry.list() for h in e.tracker_hashes]
            try:
                return self.whitelist.sync(hashes)
            except exception.TrackerError:
                if raise_errors:
                    raise
                LOG.exception("Rewriting the tracker whitelist failed")
                return False


def describe(entry: PublishedImage) -> dict[str, Any]:
    """A JSON-friendly view of an entry for the command line."""
    return {
        "image_id": entry.image_id,
        "name": entry.name,
        "size": entry.size,
        "info_hash_v1": entry.info_hash_v1,
        "info_hash_v2": entry.info_hash_v2,
        "pieces": entry.num_pieces,
        "piece_length": entry.piece_length,
        "published_at": entry.published_at,
        "data": entry.data_path if entry.has_data() else None,
        "magnet": entry.magnet,
    }
