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

"""Publishing: a Glance image becomes a torrent the origin seeder serves.

``publish`` reads the image from Glance once (a verified download), builds a torrent of
it in ``origin_torrent_format`` (v1, v2 or hybrid) named by the image id, keeps both in the
registry (:mod:`.registry`), adds the info-hashes to the tracker whitelist (:mod:`.tracker`)
and only then sets ``torrent_magnet`` (fitted by :mod:`.magnets`), ``is_torrentable=true``
and, for v2 torrents, ``torrent_bound_hash`` on the image, so a host that sees the magnet
finds a registry entry the seeder picks up within a second. The magnet names
the trackers (``tr=``) and the origin seeders (``x.pe=``) and never a web seed: compute
hosts must not pull from Glance over HTTP through the swarm.

``torrent_bound_hash`` (``<os_hash_algo>:<os_hash_value>:<v2 info-hash>``) states that the
v2 torrent holds exactly the bytes Glance's hash names: compute hosts with
``trust_torrent_root`` then skip their whole-image re-read (see the security docs). Hybrid
torrents are not bound: libtorrent passes a hybrid piece on its SHA-1 alone while the
piece's v2 hashes are still unknown (``torrent::on_piece_verified``), so "every piece
passed" would not prove the SHA-256 Merkle root.

With ``origin_zone`` set, the node serves one zone of several sharing the Glance: the
magnet names only the info-hash (every node of every zone writes the same one), and the
zone's stripe servers, trackers and seeders go into ``torrent_zone_<zone>``
(:mod:`nova_torrent_images.glance.zones`), the only property a node writes that differs
between zones. Unpublishing removes the zone's property, and the magnet only when no other
zone's remains.

Publishing is idempotent: when the registry entry matches Glance's record (same size and
``os_hash_value``) and the configured torrent format, and the image already carries the
same magnet, bound hash and ``is_torrentable=true``, nothing is written anywhere and Glance
is not updated.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from oslo_config import cfg
from oslo_log import log as logging

from nova_torrent_images import exception
from nova_torrent_images.common import utils
from nova_torrent_images.common.utils import atomic_write, parse_host_port
from nova_torrent_images.glance.client import GlanceClient
from nova_torrent_images.glance.image import WEAK_HASH_ALGOS, ImageInfo, parse_image
from nova_torrent_images.glance.magnet import MAGNET_MAX_LENGTH
from nova_torrent_images.glance.zones import (
    ZONE_PROPERTY_PREFIX,
    ZoneError,
    ZoneRoute,
    image_routes,
    parse_stripe_list,
    swarm_hints,
    validate_zone_name,
    zone_property,
)
from nova_torrent_images.origin.magnet_fit import fit_magnet
from nova_torrent_images.origin.registry import PublishedImage, Registry, validate_image_id
from nova_torrent_images.origin.tracker import TrackerWhitelist
from nova_torrent_images.swarm.torrent import make_torrent

LOG = logging.getLogger(__name__)

PUBLISHABLE_DISK_FORMATS = ("raw",)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


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

    def zone(self) -> str | None:
        """This node's zone (``origin_zone``), checked; None when it serves one zone."""
        zone = (self.opts.origin_zone or "").strip() or None
        if zone is not None:
            try:
                validate_zone_name(zone)
            except ZoneError as exc:
                raise exception.ConfigError(option="origin_zone", reason=str(exc)) from None
        return zone

    def zone_route(self) -> ZoneRoute | None:
        """This zone's route for ``torrent_zone_<zone>``; None without ``origin_zone``."""
        zone = self.zone()
        if zone is None:
            return None
        route = ZoneRoute(
            zone,
            tuple(self.stripe_urls()),
            tuple(self.trackers()),
            tuple(self.advertise_peers()),
        )
        if route.empty:
            raise exception.ConfigError(
                option="origin_stripe_advertise",
                reason=f"zone {zone}'s property would name no stripe server, tracker or "
                "origin seeder, so no host of the zone could find the image; set "
                "origin_stripe_advertise, origin_trackers or origin_advertise_addresses",
            )
        try:
            if route.stripes:  # hosts take only http://<IP>:<port>: refuse others here
                parse_stripe_list(",".join(route.stripes))
            route.format()
        except ZoneError as exc:
            raise exception.ConfigError(option="origin_stripe_advertise", reason=str(exc)) from None
        return route

    def zone_routes(
        self, properties: Mapping[str, object], own: ZoneRoute | None
    ) -> list[ZoneRoute]:
        """Every zone's route on the image, this node's zone's replaced by ``own`` (or
        left out: None), in zone name order."""
        routes = image_routes(properties, self.opts.stripes_property)
        for key, why in sorted(routes.unusable.items()):
            if key != self.opts.stripes_property:
                LOG.warning("Property %s is not usable, its zone is left out: %s", key, why)
        by_zone = {z: r for z, r in routes.by_zone.items() if z is not None}
        by_zone.pop(self.zone() or "", None)
        if own is not None:
            by_zone[own.zone or ""] = own
        return [by_zone[z] for z in sorted(by_zone)]

    def _zone_magnet(
        self, entry: PublishedImage, properties: Mapping[str, object], own: ZoneRoute | None
    ) -> tuple[str, list[str]]:
        trackers, peers = swarm_hints(self.zone_routes(properties, own))
        return self._fit(entry, trackers, peers, option="origin_zone")

    @staticmethod
    def _fit(
        entry: PublishedImage, trackers: list[str], peers: list[tuple[str, int]], *, option: str
    ) -> tuple[str, list[str]]:
        """:func:`fit_magnet` for ``entry``; a hint that does not parse back (MagnetError,
        a ValueError) is a ConfigError of ``option``."""
        try:
            return fit_magnet(
                image_id=entry.image_id,
                info_hash_v1=entry.info_hash_v1,
                info_hash_v2=entry.info_hash_v2,
                trackers=trackers,
                peers=peers,
            )
        except ValueError as exc:
            raise exception.ConfigError(option=option, reason=str(exc)) from exc

    def magnet_for(
        self, entry: PublishedImage, properties: Mapping[str, object] | None = None
    ) -> tuple[str, list[str]]:
        """The magnet to write for ``entry``, and what did not fit.

        With ``origin_zone`` it names the trackers and seeders of every zone that serves
        the image (``properties``' ``torrent_zone_*``, this node's own from its settings):
        a function of those properties, so every node that sees them writes the same
        magnet, and any BitTorrent client finds the swarm from the magnet alone.
        """
        route = self.zone_route()
        if route is not None:
            return self._zone_magnet(entry, properties or {}, route)
        trackers, peers = self.trackers(), self.advertise_peers()
        if not trackers and not peers:
            raise exception.ConfigError(
                option="origin_advertise_addresses",
                reason="the magnet would name neither a tracker nor an origin seeder, so no "
                "host could find the swarm; set origin_advertise_addresses (host:port of "
                "the origin seeders) and/or origin_trackers",
            )
        return self._fit(entry, trackers, peers, option="origin_trackers")

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
            bound_hash_property=self.opts.bound_hash_property,
        )

    @staticmethod
    def bound_hash_for(entry: PublishedImage) -> str | None:
        """The bound hash property of ``entry``: None unless a v2 torrent and a strong hash.

        Only v2-only torrents: the v2 info-hash commits to an info dictionary without v1
        piece hashes, so libtorrent can pass a piece only on the v2 Merkle tree.
        """
        if entry.torrent_format != "v2" or not entry.hash_value:
            return None
        if entry.hash_algo in WEAK_HASH_ALGOS:  # an image older than Glance multihash (md5)
            return None
        return f"{entry.hash_algo}:{entry.hash_value}:{entry.info_hash_v2}"

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
            elif entry is not None and entry.torrent_format != self.opts.origin_torrent_format:
                LOG.warning(
                    "Image %s was published as a %s torrent, origin_torrent_format is now %s; "
                    "publishing it again",
                    image_id,
                    entry.torrent_format,
                    self.opts.origin_torrent_format,
                )
                self.registry.remove(image_id)
                entry = None
            created = entry is None
            read = 0
            if created:
                # Settings problems (no tracker nor hint, a magnet that cannot fit) show
                # before the image is read: the hashes' lengths are all that matter.
                fmt = self.opts.origin_torrent_format
                v1 = "0" * 40 if fmt != "v2" else None
                v2 = "0" * 64 if fmt != "v1" else None
                self.magnet_for(PublishedImage(image_id, 0, "", "", v1, v2, 0, 0), image.properties)
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
            # Two reads of the same staged bytes: the download checks them against Glance's
            # os_hash_value as it writes them, then make_torrent hashes the file for its
            # pieces. Nothing writes the staging file in between (a private directory of
            # the registry, under the image lock), so the torrent, and the bound hash
            # written in _advertise, describe exactly the bytes Glance's hash names.
            self.glance.download(image, staging.data_path)
            torrent = make_torrent(
                staging.data_path, name=image.id, version=self.opts.origin_torrent_format
            )
            if torrent.size != image.size:
                raise exception.PublishError(
                    image_id=image.id,
                    reason=f"the torrent covers {torrent.size} bytes, Glance says {image.size}",
                )
            atomic_write(staging.torrent_path, torrent.data)
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

    def stripe_urls(self) -> list[str]:
        """The origin nodes' stripe URLs for the stripes property (empty: no stripes)."""
        if self.opts.origin_stripe_advertise:
            return list(self.opts.origin_stripe_advertise)
        listen = self.opts.origin_stripe_listen
        if not listen:
            return []
        host, port = utils.parse_listen_address(listen)
        if port == 0 or utils.is_ip_literal(host) and ipaddress.ip_address(host).is_unspecified:
            return []  # no address hosts could use: set origin_stripe_advertise
        return [f"http://{utils.format_host_port(host, port)}"]

    def _advertise(
        self, image: ImageInfo, entry: PublishedImage, created: bool, read: int, start: float
    ) -> PublishResult:
        if self.zone() is not None:
            # Other zones' nodes may have published while this one read the image: the
            # magnet is computed from the zone properties as they are now.
            image = self._image_info(image.id)
        magnet, dropped = self.magnet_for(entry, image.properties)
        if dropped:
            # With zones a short magnet is expected: hosts read their zone's property.
            (LOG.info if self.zone() is not None else LOG.warning)(
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
        bound = self.bound_hash_for(entry)
        current_bound = image.properties.get(self.opts.bound_hash_property)
        if bound is not None and current_bound != bound:
            props[self.opts.bound_hash_property] = bound
        remove = [self.opts.bound_hash_property] if bound is None and current_bound else []
        route = self.zone_route()
        # With zones the stripes are in the zone's property; the zone-neutral list goes.
        stripes = ",".join(self.stripe_urls()) if route is None else ""
        current_stripes = image.properties.get(self.opts.stripes_property)
        if stripes and current_stripes != stripes:
            props[self.opts.stripes_property] = stripes
        elif not stripes and current_stripes:
            remove.append(self.opts.stripes_property)
        if route is not None:
            key, value = zone_property(route.zone or ""), route.format()
            current = image.properties.get(key)
            if current != value:
                if current:
                    LOG.warning(
                        "Image %s: %s was %r, this node writes %r: every origin node of "
                        "zone %s needs the same origin_stripe_advertise, origin_trackers "
                        "and origin_advertise_addresses",
                        image.id,
                        key,
                        current,
                        value,
                        route.zone,
                    )
                props[key] = value
        if props:
            # One update: a host never sees the new magnet with an old bound hash.
            self.glance.set_properties(image.id, **props)
            LOG.info("Image %s: set %s in Glance", image.id, ", ".join(sorted(props)))
        if remove:
            # After the update: a bound hash left over names another torrent than the new
            # magnet (no v2 torrent at all), so no host trusted it in between.
            self.glance.remove_properties(image.id, remove)
            LOG.info("Image %s: removed %s from Glance", image.id, ", ".join(remove))
        if (entry.magnet, entry.set_torrentable, entry.dropped_from_magnet) != (
            magnet,
            set_torrentable,
            dropped,
        ):
            entry = dataclasses.replace(
                entry, magnet=magnet, set_torrentable=set_torrentable, dropped_from_magnet=dropped
            )
            self.registry.save(entry)
        status = "published" if created else ("updated" if props or remove else "unchanged")
        seconds = time.monotonic() - start
        LOG.info(
            "Image %s: %s (%d MiB, %s torrent, %d pieces of %d KiB, %s) in %.1fs: %s",
            image.id,
            status,
            entry.size >> 20,
            entry.torrent_format,
            entry.num_pieces,
            entry.piece_length >> 10,
            f"v2 {entry.info_hash_v2}" if entry.info_hash_v2 else f"v1 {entry.info_hash_v1}",
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
        if self.opts.stripes_property in image.properties:
            remove.append(self.opts.stripes_property)
        zone = self.zone()
        if zone is not None:
            own = zone_property(zone)
            if own in image.properties:
                remove.append(own)
            others = [
                k for k in image.properties if k.startswith(ZONE_PROPERTY_PREFIX) and k != own
            ]
            if others:
                # Other zones still serve the image: their hosts keep the magnet, which
                # stops naming this zone's trackers and seeders.
                LOG.info(
                    "Image %s: %s still name origin nodes; the magnet stays",
                    image_id,
                    ", ".join(sorted(others)),
                )
                keep = {self.opts.magnet_property, self.opts.torrentable_property}
                keep.add(self.opts.bound_hash_property)
                remove = [k for k in remove if k not in keep]
                if entry is not None and entry.named_by(image.magnet_uri):
                    magnet, _ = self._zone_magnet(entry, image.properties, None)
                    if magnet != image.magnet_uri:
                        self.glance.set_properties(image_id, **{self.opts.magnet_property: magnet})
                        LOG.info("Image %s: the magnet no longer names zone %s", image_id, zone)
        if self.opts.bound_hash_property in image.properties and (
            entry is None
            or image.bound_hash is None  # unparsable: of no use to anyone
            or image.bound_hash.info_hash_v2 == entry.info_hash_v2
        ):
            remove.append(self.opts.bound_hash_property)
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
        return self._check_entry(entry)[0]

    def _check_entry(
        self, entry: PublishedImage
    ) -> tuple[tuple[str, bool] | None, ImageInfo | None]:
        """:meth:`stale_reason`, and the image record it read (None: none could be)."""
        try:
            image = self._image_info(entry.image_id)
        except exception.ImageNotFound:
            return ("it was deleted from Glance", False), None
        except exception.InvalidImageMetadata as exc:
            return (f"its Glance record is no longer usable: {exc}", True), None
        except exception.TorrentImagesError as exc:
            LOG.warning(
                "Image %s: cannot check it in Glance, still seeding: %s", entry.image_id, exc
            )
            return None, None
        return self._stale(entry, image), image

    def _stale(self, entry: PublishedImage, image: ImageInfo) -> tuple[str, bool] | None:
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
                stale, image = self._check_entry(current)
                if stale is None:
                    if image is not None:
                        self._refresh_zone_magnet(current, image)
                    continue
                reason, fix_glance = stale
                LOG.warning("Image %s is unpublished: %s", entry.image_id, reason)
                try:
                    results.append(self._unpublish_locked(entry.image_id, reason, fix_glance))
                except exception.TorrentImagesError as exc:
                    LOG.error("Image %s: unpublishing failed: %s", entry.image_id, exc)
        self.registry.cleanup_staging()
        return results

    def _refresh_zone_magnet(self, entry: PublishedImage, image: ImageInfo) -> None:
        """Write the magnet the image's zone properties now call for (nodes of two zones
        that published at the same moment each wrote one naming only their own zone)."""
        zone = self.zone()
        if zone is None or zone_property(zone) not in image.properties:
            return  # not (or no longer) this zone's to speak for
        try:
            magnet, _ = self.magnet_for(entry, image.properties)
            if magnet == image.magnet_uri:
                return
            self.glance.set_properties(entry.image_id, **{self.opts.magnet_property: magnet})
        except exception.TorrentImagesError as exc:
            LOG.warning("Image %s: the magnet is left as it is: %s", entry.image_id, exc)
            return
        self.registry.save(dataclasses.replace(entry, magnet=magnet))
        LOG.info("Image %s: the magnet now names every zone that serves it", entry.image_id)

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
