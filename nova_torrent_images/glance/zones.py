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

"""Where a zone's hosts find an image: one Glance property per zone, parsed strictly.

An origin node of zone ``Z`` (``[torrent_images] origin_zone``) writes the image property
``torrent_zone_Z``::

    stripes=http://10.1.0.5:9480,http://10.1.0.6:9480;trackers=http://10.1.0.5:6969/announce;peers=10.1.0.5:6881

its zone's stripe servers, trackers and origin seeders. Every origin node of every zone
publishes the same torrent and writes only its own zone's property, so nodes of different
zones never overwrite each other's routes. One property per zone keeps each within
Glance's 255 characters however many zones share the Glance (one list of every zone's
nodes would not fit beyond a handful).

The magnet stays usable on its own, by any BitTorrent client: with zones it names the
trackers and seeders of the zones that serve the image (:func:`swarm_hints`, the first of
each zone first, as many as fit), computed from the zone properties alone, so every node
that sees the same properties writes the same magnet. A compute host of a zone leaves the
hints that only other zones' properties name to those zones (:func:`foreign_hints`).

The image's zone-neutral hints (the ``torrent_stripes`` property and the magnet's ``tr=``
and ``x.pe=`` that no zone property names, written by origin nodes without a zone) are
the route of zone ``None``.

A compute host of zone ``Z`` (``[torrent_images] zone``) takes its own zone's route first,
then the zone-neutral one, then (``cross_zone_fallback``) the other zones' in name order:
:func:`plan`. The info-hash is the same in every zone, so a seed of any zone is valid; the
order only keeps the bytes inside the zone. Any image owner may write these properties, so
parsing is bounded and only IP-literal stripe URLs are taken; the host checks them against
``allowed_peer_cidrs`` as well.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from nova_torrent_images.common.utils import format_host_port, parse_host_port
from nova_torrent_images.glance.magnet import MAGNET_MAX_LENGTH, MagnetError, parse_tracker

ZONE_PROPERTY_PREFIX = "torrent_zone_"
PROPERTY_MAX_LENGTH = MAGNET_MAX_LENGTH  # Glance's limit of a property value
MAX_ZONES = 32  # routes a host reads from one image; more are ignored (logged by the caller)
MAX_STRIPE_URLS = 8
MAX_ENTRIES = 8  # trackers or peers of one zone
_ZONE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_FIELDS = ("stripes", "trackers", "peers")


class ZoneError(ValueError):
    """A zone name or a zone property is malformed; the message says which part and why."""


def validate_zone_name(name: str) -> str:
    """``name`` if it can name a zone (letters, digits, ``_.-``, at most 63), else ZoneError."""
    if not isinstance(name, str) or not _ZONE_NAME.fullmatch(name):
        raise ZoneError(
            f"{name!r} is not a zone name (1 to 63 letters, digits, '_', '.', '-', "
            "starting with a letter or digit)"
        )
    return name


def zone_property(zone: str) -> str:
    """The image property of ``zone``'s route."""
    return ZONE_PROPERTY_PREFIX + validate_zone_name(zone)


def parse_stripe_list(value: object) -> tuple[str, ...]:
    """Comma-separated ``http://<IP>:<port>`` URLs, de-duplicated in order; ZoneError if not.

    No names to resolve: a host connects to what the property says and nothing else.
    """
    if not isinstance(value, str):
        raise ZoneError(f"it is a {type(value).__name__}, not a string")
    urls = tuple(dict.fromkeys(u.strip() for u in value.split(",") if u.strip()))
    if not urls or len(urls) > MAX_STRIPE_URLS:
        raise ZoneError(f"it names {len(urls)} stripe URLs (1 to {MAX_STRIPE_URLS})")
    for url in urls:
        parts = urllib.parse.urlsplit(url)
        try:
            ipaddress.ip_address(parts.hostname or "")
            port = parts.port
        except ValueError:
            raise ZoneError(f"{url!r} is not http://<IP address>:<port>") from None
        if parts.scheme != "http" or not port or parts.path not in ("", "/"):
            raise ZoneError(f"{url!r} is not http://<IP address>:<port>")
    return urls


@dataclass(frozen=True)
class ZoneRoute:
    """How one zone's hosts reach an image: its origin nodes' stripes, trackers, seeders."""

    zone: str | None  # None: the image's zone-neutral hints
    stripes: tuple[str, ...] = ()
    trackers: tuple[str, ...] = ()
    peers: tuple[tuple[str, int], ...] = ()

    def format(self) -> str:
        """The property value; ZoneError when it exceeds Glance's 255 characters."""
        fields = {
            "stripes": ",".join(self.stripes),
            "trackers": ",".join(self.trackers),
            "peers": ",".join(format_host_port(h, p) for h, p in self.peers),
        }
        value = ";".join(f"{k}={v}" for k, v in fields.items() if v)
        if len(value) > PROPERTY_MAX_LENGTH:
            raise ZoneError(
                f"the route of zone {self.zone} takes {len(value)} characters, more than "
                f"Glance's {PROPERTY_MAX_LENGTH}: advertise fewer stripe servers, trackers "
                "or seeders per zone"
            )
        return value

    @property
    def empty(self) -> bool:
        return not (self.stripes or self.trackers or self.peers)


def parse_zone_route(zone: str | None, value: object) -> ZoneRoute:
    """``zone``'s route from its property value; ZoneError says what is wrong."""
    if not isinstance(value, str):
        raise ZoneError(f"it is a {type(value).__name__}, not a string")
    if len(value) > 4 * PROPERTY_MAX_LENGTH:
        raise ZoneError(f"it is {len(value)} characters long")
    found: dict[str, str] = {}
    for item in value.split(";"):
        if not item.strip():
            continue
        key, sep, rest = item.partition("=")
        key = key.strip()
        if not sep or key not in _FIELDS:
            raise ZoneError(f"{item.strip()!r} is not one of {', '.join(_FIELDS)} = ...")
        if key in found:
            raise ZoneError(f"{key} is given twice")
        found[key] = rest.strip()
    stripes = parse_stripe_list(found["stripes"]) if found.get("stripes") else ()
    trackers, peers = [], []
    for text in _entries(found.get("trackers", ""), "trackers"):
        try:
            trackers.append(parse_tracker(text))
        except MagnetError as exc:
            raise ZoneError(str(exc)) from None
    for text in _entries(found.get("peers", ""), "peers"):
        try:
            peers.append(parse_host_port(text))
        except ValueError as exc:
            raise ZoneError(f"peer {text!r}: {exc}") from None
    return ZoneRoute(zone, stripes, tuple(trackers), tuple(peers))


def _entries(value: str, what: str) -> list[str]:
    entries = list(dict.fromkeys(e.strip() for e in value.split(",") if e.strip()))
    if len(entries) > MAX_ENTRIES:
        raise ZoneError(f"it names {len(entries)} {what} (at most {MAX_ENTRIES})")
    return entries


@dataclass(frozen=True)
class Routes:
    """Every route an image's properties give, and the ones that could not be read."""

    by_zone: dict[str | None, ZoneRoute]
    unusable: dict[str, str]  # property -> why it was not used

    def zones(self) -> list[str]:
        return sorted(z for z in self.by_zone if z is not None)


def image_routes(properties: Mapping[str, object], stripes_property: str) -> Routes:
    """The routes of an image: ``torrent_zone_*`` properties and the zone-neutral stripes.

    The magnet's own trackers and seeders are used by every host anyway; they are not
    repeated here.
    """
    by_zone: dict[str | None, ZoneRoute] = {}
    unusable: dict[str, str] = {}
    neutral = properties.get(stripes_property)
    if neutral:
        try:
            by_zone[None] = ZoneRoute(None, parse_stripe_list(neutral))
        except ZoneError as exc:
            unusable[stripes_property] = str(exc)
    names = sorted(k for k in properties if k.startswith(ZONE_PROPERTY_PREFIX))
    for key in names[:MAX_ZONES]:
        zone = key[len(ZONE_PROPERTY_PREFIX) :]
        try:
            validate_zone_name(zone)
            route = parse_zone_route(zone, properties[key])
        except ZoneError as exc:
            unusable[key] = str(exc)
            continue
        if not route.empty:
            by_zone[zone] = route
    for key in names[MAX_ZONES:]:
        unusable[key] = f"more than {MAX_ZONES} zone properties"
    return Routes(by_zone, unusable)


def plan(routes: Routes, zone: str | None, *, cross_zone: bool) -> list[ZoneRoute]:
    """The routes a host of ``zone`` uses, in order: its own, the zone-neutral one, then
    (``cross_zone``, or a host without a zone) the other zones' in name order."""
    order: list[ZoneRoute] = []
    for key in (zone, None) if zone is not None else (None,):
        if key in routes.by_zone:
            order.append(routes.by_zone[key])
    if cross_zone or zone is None:
        order.extend(routes.by_zone[z] for z in routes.zones() if z != zone)
    return order


def swarm_hints(routes: Iterable[ZoneRoute]) -> tuple[list[str], list[tuple[str, int]]]:
    """The trackers and seeders of ``routes`` for a magnet, interleaved by zone.

    The first tracker (and seeder) of every zone comes before any zone's second, so a
    magnet shortened to Glance's 255 characters (trackers and seeders dropped last first)
    keeps one of each zone as long as it can.
    """
    routes = list(routes)
    trackers: dict[str, None] = {}
    peers: dict[tuple[str, int], None] = {}
    for i in range(max([len(r.trackers) for r in routes] + [len(r.peers) for r in routes] + [0])):
        for route in routes:
            if i < len(route.trackers):
                trackers.setdefault(route.trackers[i])
            if i < len(route.peers):
                peers.setdefault(route.peers[i])
    return list(trackers), list(peers)


def foreign_hints(routes: Routes, zone: str | None) -> tuple[set[str], set[tuple[str, int]]]:
    """Trackers and seeders that only other zones' properties name.

    A host of ``zone`` takes the magnet's other hints and leaves these to their zones; it
    reaches another zone through that zone's route, when :func:`plan` gets there. A host
    without a zone leaves nothing out.
    """
    if zone is None:
        return set(), set()
    own = routes.by_zone.get(zone, ZoneRoute(zone))
    others = [r for z, r in routes.by_zone.items() if z not in (None, zone)]
    trackers = {t for r in others for t in r.trackers} - set(own.trackers)
    peers = {p for r in others for p in r.peers} - set(own.peers)
    return trackers, peers
