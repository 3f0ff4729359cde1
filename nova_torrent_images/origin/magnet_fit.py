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

"""The magnet a published image carries in Glance, fitted to Glance's 255 characters.

Hosts learn everything they need to join a swarm from the ``torrent_magnet`` property:
the info-hashes, the trackers (``tr=``) and the origin seeders (``x.pe=``). Glance keeps at
most 255 characters in a property, so :func:`fit_magnet` drops the least useful parts
until the magnet fits, in a documented order, and says what it dropped. It never adds a
web seed: compute hosts must not pull from Glance over HTTP through the swarm.
"""

from __future__ import annotations

from collections.abc import Sequence

from nova_torrent_images import exception
from nova_torrent_images.common.utils import format_host_port
from nova_torrent_images.glance.magnet import (
    MAGNET_MAX_LENGTH,
    MAX_PEER_HINTS,
    MAX_TRACKERS,
    build_magnet,
)


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
    2. the v1 info-hash (``urn:btih``) of a hybrid torrent: the v2 hash alone identifies
       it, is the stronger hash (SHA-256), and libtorrent 2.x hosts fetch a hybrid torrent
       from it; the tracker whitelist carries the truncated v2 hash for such hosts. A v1
       or v2 torrent has one hash (the other is ``None``) and always keeps it;
    3. peer hints (``x.pe``) after the first, last first: peer exchange spreads the rest;
    4. trackers after the first, last first;
    5. the last peer hint, when a tracker remains (the origin seeder announces to it).

    Hints and trackers beyond what a host parses (16 of each) are dropped before anything
    else: they could never fit, and hosts would refuse the whole magnet.

    Raises :class:`MagnetTooLong` if even that does not fit, and ``MagnetError`` (a
    ``ValueError``) when a tracker or hint would not parse back.
    """
    name: str | None = image_id
    v1 = info_hash_v1
    trackers, peers = list(trackers), list(peers)
    dropped: list[str] = []
    while len(peers) > MAX_PEER_HINTS:
        dropped.append("x.pe=" + format_host_port(*peers.pop()))
    while len(trackers) > MAX_TRACKERS:
        dropped.append("tr=" + trackers.pop())

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
        dropped.append("x.pe=" + format_host_port(*peers.pop()))
        uri = build()
    while len(uri) > max_length and len(trackers) > 1:
        dropped.append("tr=" + trackers.pop())
        uri = build()
    if len(uri) > max_length and trackers and peers:
        dropped.append("x.pe=" + format_host_port(*peers.pop()))
        uri = build()
    if len(uri) > max_length:
        raise exception.MagnetTooLong(image_id=image_id, length=len(uri), limit=max_length)
    return uri, dropped
