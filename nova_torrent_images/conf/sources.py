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

"""Options of a compute host's sources besides the swarm: image locations, zone caches."""

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
        help="This host's zone: image locations whose metadata names it ('zone') are "
        "preferred over others of the same preference.",
    ),
    cfg.ListOpt(
        "zone_caches",
        default=[],
        help="Base URLs of HTTP caching proxies in front of the Glance API in this host's "
        "zone; the image is read as <cache>/v2/images/<id>/file.",
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
