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

"""Magnet URIs: strict parsing and building, in plain Python (no libtorrent).

A magnet in Glance metadata is the trust root of a swarm download, so parsing is strict and
only the parts we understand are kept: info-hashes, trackers and origin peer hints. Nothing
in a magnet is fetched or executed; ``ws=``/``as=``/``xs=`` style sources are dropped, so
compute hosts never use a web seed a magnet points at. Parsing is bounded (length, number
of trackers and hints) because any image owner can write the property.
"""

from __future__ import annotations

import base64
import binascii
import re
import urllib.parse
from dataclasses import dataclass, field

from nova_torrent_images.common.utils import format_host_port, parse_host_port

MAGNET_MAX_LENGTH = 255  # Glance limits a property value to 255 characters.
# What a host parses at most: Glance's limit with room for a deployment that raised it.
# A longer value is refused before any work is spent on it.
PARSE_MAX_LENGTH = 4096
MAX_TRACKERS = 16
MAX_PEER_HINTS = 16
TRACKER_SCHEMES = ("http", "https", "udp")

_HEX40 = re.compile(r"^[0-9a-fA-F]{40}$")
_BASE32_32 = re.compile(r"^[A-Za-z2-7]{32}$")
_BTMH_SHA256 = re.compile(r"^1220([0-9a-fA-F]{64})$")


class MagnetError(ValueError):
    """A magnet URI is malformed; the message says which part and why."""


@dataclass(frozen=True)
class Magnet:
    """The parts of a magnet URI this library acts on."""

    info_hash_v1: str | None = None  # 40 lowercase hex digits (SHA-1)
    info_hash_v2: str | None = None  # 64 lowercase hex digits (SHA-256)
    name: str | None = None
    trackers: tuple[str, ...] = ()
    peers: tuple[tuple[str, int], ...] = field(default=())

    @property
    def best_hash(self) -> str:
        """The strongest info-hash present, as hex (used for naming and logging)."""
        return self.info_hash_v2 or self.info_hash_v1 or ""

    def to_uri(self) -> str:
        return build_magnet(
            info_hash_v1=self.info_hash_v1,
            info_hash_v2=self.info_hash_v2,
            name=self.name,
            trackers=self.trackers,
            peers=self.peers,
            max_length=None,
        )


def _parse_peer(value: str) -> tuple[str, int]:
    try:
        return parse_host_port(value)
    except ValueError as exc:
        raise MagnetError(f"x.pe {exc}") from None


def parse_tracker(value: str) -> str:
    """``value`` if it is a tracker URL a host may announce to, else MagnetError."""
    parsed = urllib.parse.urlsplit(value)
    if parsed.scheme not in TRACKER_SCHEMES:
        raise MagnetError(f"tracker {value!r} must use one of {', '.join(TRACKER_SCHEMES)}")
    if not parsed.hostname:
        raise MagnetError(f"tracker {value!r} has no host")
    try:
        parsed.port  # noqa: B018  (raises ValueError on a bad port)
    except ValueError:
        raise MagnetError(f"tracker {value!r} has an invalid port") from None
    return value


def _parse_btih(value: str) -> str:
    if _HEX40.match(value):
        return value.lower()
    if _BASE32_32.match(value):
        return binascii.hexlify(base64.b32decode(value.upper())).decode()
    raise MagnetError("urn:btih must be 40 hex digits or 32 base32 characters")


def parse_magnet(uri: object) -> Magnet:
    """Parse and validate a magnet URI; raise :class:`MagnetError` on anything off."""
    if not isinstance(uri, str):
        raise MagnetError(f"it is a {type(uri).__name__}, not a string")
    if not uri:
        raise MagnetError("it is empty")
    if len(uri) > PARSE_MAX_LENGTH:
        raise MagnetError(f"it is {len(uri)} characters, more than {PARSE_MAX_LENGTH}")
    if not uri.startswith("magnet:?"):
        raise MagnetError("it does not start with 'magnet:?'")
    try:
        pairs = urllib.parse.parse_qsl(uri[len("magnet:?") :], strict_parsing=True)
    except ValueError as exc:
        raise MagnetError(f"its query is malformed ({exc})") from None
    v1 = v2 = name = None
    trackers: list[str] = []
    peers: list[tuple[str, int]] = []
    for key, value in pairs:
        if key == "xt":
            if value.startswith("urn:btih:"):
                new_v1 = _parse_btih(value[len("urn:btih:") :])
                if v1 is not None and v1 != new_v1:
                    raise MagnetError("it has two different urn:btih hashes")
                v1 = new_v1
            elif value.startswith("urn:btmh:"):
                match = _BTMH_SHA256.match(value[len("urn:btmh:") :])
                if not match:
                    raise MagnetError("urn:btmh must be '1220' followed by 64 hex digits")
                if v2 is not None and v2 != match.group(1).lower():
                    raise MagnetError("it has two different urn:btmh hashes")
                v2 = match.group(1).lower()
            else:
                raise MagnetError(f"xt {value!r} is neither urn:btih nor urn:btmh")
        elif key == "tr":
            trackers.append(parse_tracker(value))
        elif key == "x.pe":
            peers.append(_parse_peer(value))
        elif key == "dn":
            name = value
        # Any other key (ws, as, xs, kt, so, ...) is ignored on purpose: it would make
        # hosts fetch from places Glance metadata does not vouch for.
    if v1 is None and v2 is None:
        raise MagnetError("it has no xt=urn:btih or xt=urn:btmh info-hash")
    trackers, peers = list(dict.fromkeys(trackers)), list(dict.fromkeys(peers))
    if len(trackers) > MAX_TRACKERS:
        raise MagnetError(f"it names {len(trackers)} trackers, more than {MAX_TRACKERS}")
    if len(peers) > MAX_PEER_HINTS:
        raise MagnetError(f"it names {len(peers)} x.pe peers, more than {MAX_PEER_HINTS}")
    return Magnet(v1, v2, name, tuple(trackers), tuple(peers))


def build_magnet(
    *,
    info_hash_v1: str | None = None,
    info_hash_v2: str | None = None,
    name: str | None = None,
    trackers: tuple[str, ...] | list[str] = (),
    peers: tuple[tuple[str, int], ...] | list[tuple[str, int]] = (),
    max_length: int | None = MAGNET_MAX_LENGTH,
) -> str:
    """Build a magnet URI. Raise :class:`MagnetError` if it exceeds ``max_length``.

    The v2 hash alone identifies a hybrid torrent, so callers short of space can leave out
    the v1 hash, the name or hints; this function never drops parts by itself.
    """
    if not info_hash_v1 and not info_hash_v2:
        raise MagnetError("a magnet needs at least one info-hash")
    parts = []
    if info_hash_v1:
        parts.append(f"xt=urn:btih:{info_hash_v1.lower()}")
    if info_hash_v2:
        parts.append(f"xt=urn:btmh:1220{info_hash_v2.lower()}")
    if name:
        parts.append("dn=" + urllib.parse.quote(name, safe=""))
    parts.extend("tr=" + urllib.parse.quote(t, safe="") for t in trackers)
    parts.extend("x.pe=" + urllib.parse.quote(format_host_port(h, p), safe=":[]") for h, p in peers)
    uri = "magnet:?" + "&".join(parts)
    if max_length is not None and len(uri) > max_length:
        raise MagnetError(f"the magnet is {len(uri)} characters, more than {max_length}")
    parse_magnet(uri)  # what we publish must parse back
    return uri
