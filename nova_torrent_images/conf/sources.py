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

"""Options of a compute host's sources besides the swarm: image locations, zone caches
(``zone_caches`` is deprecated: a caching proxy belongs in front of the origin's stripe
server, see its ``deprecated_reason``)."""

from __future__ import annotations

from oslo_config import cfg

from nova_torrent_images.conf import groups

source_opts = [
    cfg.ListOpt(
        "source_order",
        default=["torrent", "locations", "glance"],
        item_type=cfg.types.String(choices=["torrent", "locations", "glance"]),
        help="The order in which a host tries its sources: 'torrent' (the swarm, for "
        "images policy sends there), 'locations' (the image's own file:// and http(s):// "
        "locations Glance shows, and the zone_caches, ranked by location_preference, "
        "zone and measured throughput) and 'glance' (the Glance API). A failure or a "
        "stall moves to the next; every byte is verified against Glance's hash.",
    ),
    cfg.ListOpt(
        "location_preference",
        default=[],
        help="URL prefixes of image locations in order of preference (e.g. "
        "file:///mnt/images/, http://cache.zone-a/); a location matching none comes after "
        "those that match one.",
    ),
    cfg.StrOpt(
        "zone",
        help="This host's zone (letters, digits, '_', '.', '-'), as its zone's origin "
        "nodes name it in origin_zone: the host fetches an image from the stripe "
        "servers, trackers and origin seeders of the image property torrent_zone_<zone> "
        "first, and from other zones' only as cross_zone_fallback allows. Image locations "
        "whose metadata names it ('zone') are preferred over others of the same "
        "preference. Unset: the image's zone-neutral hints, then every zone's.",
    ),
    cfg.ListOpt(
        "zone_caches",
        default=[],
        deprecated_for_removal=True,
        deprecated_reason="A zone cache in front of the Glance API is read without a "
        "token, so it works only with a Glance that serves image data without one "
        "(noauth, or an internal endpoint that trusts the network), and a proxy that "
        "caches image data Glance served with authentication would hand it to any "
        "project that asks. Put the caching proxy in front of the origin's stripe "
        "server instead and advertise it as the zone's stripe URL "
        "(origin_stripe_advertise on the zone's origin node): it caches only published, "
        "content-addressed image data, whose every byte the host verifies against "
        "Glance's hash (tests/integration/test_zone_cache.py).",
        help="Deprecated: see the reason. Base URLs of HTTP caching proxies in front of "
        "the Glance API in this host's zone; the image is read as "
        "<cache>/v2/images/<id>/file, without a token: only a Glance that serves image "
        "data without one (noauth, or a trusted internal endpoint) answers. Every byte is "
        "still verified against Glance's hash. Use a caching proxy in front of the "
        "origin's stripe server instead (origin_stripe_advertise; doc/source/origin.rst, "
        "'A zone cache in front of the origin').",
    ),
    cfg.IntOpt(
        "location_stall_timeout",
        default=30,
        min=1,
        help="Seconds without a byte after which a location or zone cache counts as "
        "stalled and the next source continues where it stopped. An http(s) location "
        "must also send its answer's headers within this long.",
    ),
    cfg.IntOpt(
        "location_min_rate",
        default=1024,
        min=0,
        help="KiB/s an http(s) location or zone cache must send at least, measured over "
        "every location_stall_timeout seconds; a slower one is abandoned and the next "
        "source continues where it stopped. 0: no minimum (only location_stall_timeout).",
    ),
    cfg.ListOpt(
        "location_file_prefixes",
        default=[],
        help="Directories under which this host reads file:// image locations: the "
        "mounts of a shared image store (e.g. /mnt/glance/images/). A file:// location "
        "outside them, reached through a symbolic link, or that is not a regular file (a "
        "device, a FIFO) is refused. Empty: file:// locations are not read.",
    ),
]

ALL_OPTS = source_opts


def register_opts(conf: cfg.ConfigOpts) -> None:
    """Register this module's options in ``[torrent_images]`` of ``conf`` (idempotent)."""
    groups.register(conf, ALL_OPTS)
