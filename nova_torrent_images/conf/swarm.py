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

"""Options of the libtorrent session of a host: listening, trackers, limits, peers, disk.

Compute hosts and the origin seeder on Glance nodes both run a session with them.
"""

from __future__ import annotations

from oslo_config import cfg

from nova_torrent_images.conf import groups

swarm_opts = [
    cfg.ListOpt(
        "listen_interfaces",
        default=["0.0.0.0:6881"],
        help="Addresses and ports libtorrent listens on for peers, as host:port. When a "
        "single specific address is given, outgoing peer connections also use it.",
    ),
    cfg.IntOpt(
        "max_retry_port_bind",
        default=10,
        min=0,
        help="If the listen port is taken, try this many following ports (the port range).",
    ),
    cfg.ListOpt(
        "trackers",
        default=[],
        help="Tracker announce URLs (http, https or udp) added to every torrent, besides "
        "the trackers named in the image's magnet.",
    ),
    cfg.IntOpt(
        "upload_rate_limit",
        default=0,
        min=0,
        help="Upload limit for the whole host in KiB/s; 0 means unlimited. It applies to "
        "datacenter (private range) peers too, so guests keep their network share.",
    ),
    cfg.IntOpt(
        "download_rate_limit",
        default=0,
        min=0,
        help="Download limit for the whole host in KiB/s; 0 means unlimited. It holds for "
        "the swarm (libtorrent's limiter) and, on a budget of its own at the same rate, for "
        "the origin's stripes: a host alone, which gets every byte as stripes, keeps to it; "
        "a host in a fleet may go above it by its stripe share (about 1/N of the image). "
        "Plain Glance downloads (the fallback) are not limited, as Nova's own are not.",
    ),
    cfg.IntOpt(
        "connections_limit",
        default=200,
        min=2,
        help="Maximum peer connections of the host's libtorrent session.",
    ),
    cfg.ListOpt(
        "allowed_peer_cidrs",
        default=[
            "10.0.0.0/8",
            "172.16.0.0/12",
            "192.168.0.0/16",
            "127.0.0.0/8",
            "fc00::/7",
            "::1/128",
        ],
        help="Peers are accepted and contacted only inside these networks (CIDR). Set it "
        "to the compute and Glance networks of the deployment. An empty list allows any "
        "address, which is not recommended.",
    ),
    cfg.StrOpt(
        "disk_io",
        default="posix",
        choices=[
            ("posix", "Plain pread/pwrite; works on block devices (XenServer VDIs)."),
            ("mmap", "Memory-mapped files; regular files only."),
            ("pread", "libtorrent 2.1 multi-threaded pread backend; regular files only."),
            ("default", "libtorrent's default backend; regular files only."),
        ],
        help="libtorrent disk I/O backend. Keep 'posix' on XenServer hosts: the others "
        "fail on block devices.",
    ),
    cfg.IntOpt(
        "min_announce_interval",
        default=300,
        min=1,
        help="Shortest interval between tracker announces, in seconds.",
    ),
]

swarm_opts += [
    cfg.BoolOpt(
        "use_origin_stripes",
        default=True,
        help="Fetch this host's share of an image's pieces from the origin nodes over HTTP "
        "(the stripes the image's stripes property names) and the rest from other hosts: "
        "the origin sends each piece about once and a fleet finishes at the origin's "
        "uplink floor. Off: the origin is a BitTorrent peer like any other.",
    ),
    cfg.StrOpt(
        "stripes_property",
        default="torrent_stripes",
        help="Glance image property listing the origin nodes' stripe URLs "
        "(comma-separated http URLs with IP addresses inside allowed_peer_cidrs), as "
        "'nova-torrent-images publish' writes it.",
    ),
    cfg.BoolOpt(
        "cross_zone_fallback",
        default=True,
        help="When none of this host's zone's origin nodes can serve an image (the image "
        "has no torrent_zone_<zone> property for the zone, or every stripe server it "
        "names refuses or resets connections), use another zone's, in zone name order, "
        "and log it: the zone then takes one copy across zones and its hosts trade the "
        "rest among themselves. Off: the host keeps to its zone, and what its swarm "
        "cannot deliver comes from Glance.",
    ),
    cfg.BoolOpt(
        "land_stripes",
        default=True,
        help="While no other host needs pieces from this one (a lone boot), write the "
        "origin's stripes into the destination directly, checked once (against the v2 "
        "piece layer with trust_torrent_root, else by the whole-image hash), instead of "
        "handing each piece to libtorrent, which copies, writes, reads back and hashes it "
        "again. Once another host needs pieces, the pieces landed so far go to libtorrent "
        "and the rest of the download is as with this option off.",
    ),
]

ALL_OPTS = swarm_opts


def register_opts(conf: cfg.ConfigOpts) -> None:
    """Register this module's options in ``[torrent_images]`` of ``conf`` (idempotent)."""
    groups.register(conf, ALL_OPTS)
