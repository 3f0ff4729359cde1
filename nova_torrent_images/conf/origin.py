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

"""Options of the origin side (Glance API nodes), group ``[torrent_images]``.

* ``publish_opts`` -- the registry of published images and what their magnets say;
* ``seeder_opts`` -- the origin seeder: rate, super-seeding, web seed, checks, statistics;
* ``stripe_opts`` -- the stripes the origin hands out over HTTP (one copy per piece);
* ``tracker_opts`` -- the opentracker whitelist and its reload;
* ``promotion_opts`` -- automatic publication: popular images, images Glance activates.

They live here and not in :mod:`nova_torrent_images.origin`, so registering every option
(as a compute host does) loads no origin code.
"""

from __future__ import annotations

from oslo_config import cfg

from nova_torrent_images.conf import groups

publish_opts = [
    cfg.StrOpt(
        "origin_state_dir",
        default="/var/lib/nova-torrent-images/origin",
        help="Registry of published images on a Glance node: one directory per image id "
        "holding the .torrent, a JSON sidecar (info-hashes, size, Glance hash) and, unless "
        "origin_data_dir is set, the image data the origin seeder serves. Written by "
        "'nova-torrent-images publish', read by 'nova-torrent-images seed'; both must use "
        "the same directory.",
    ),
    cfg.StrOpt(
        "origin_data_dir",
        help="Directory for the image data of published images (one file per image id), "
        "when it should live on another filesystem than origin_state_dir. Unset: the data "
        "is kept in each image's registry directory.",
    ),
    cfg.ListOpt(
        "origin_trackers",
        default=[],
        help="Tracker announce URLs written into the magnets of published images (tr=) "
        "and announced to by the origin seeder, e.g. http://tracker.example:6969/announce. "
        "Empty: hosts find each other through the origin seeder hints (x.pe) and peer "
        "exchange alone.",
    ),
    cfg.ListOpt(
        "origin_advertise_addresses",
        default=[],
        help="host:port of the origin seeders written into magnets as peer hints (x.pe), "
        "the address compute hosts connect to first. List every Glance node that runs "
        "'nova-torrent-images seed', with the same value on all of them, so every node "
        "publishes the same magnet. Empty: the seeder's listen_interfaces address, when "
        "it is one specific address.",
    ),
    cfg.StrOpt(
        "origin_zone",
        help="The zone this origin node serves (letters, digits, '_', '.', '-'). Set, "
        "the node writes its zone's stripe servers (origin_stripe_advertise), trackers "
        "(origin_trackers) and seeders (origin_advertise_addresses) into the image "
        "property torrent_zone_<zone> instead of torrent_stripes and the magnet, and the "
        "magnet names only the info-hash: every node of every zone publishes the same "
        "magnet and torrent and writes only its own zone's property. Compute hosts with "
        "the same [torrent_images] zone use these first. Set it on every origin node of "
        "a deployment with several zones, or on none. Unset: one zone, as before.",
    ),
    cfg.StrOpt(
        "origin_torrent_format",
        default="v2",
        choices=[
            (
                "v1",
                "BitTorrent v1 (SHA-1 pieces): every client joins, including aria2 and "
                "transmission 3.x; compute hosts always re-read the image to verify it.",
            ),
            (
                "v2",
                "BitTorrent v2 (SHA-256 Merkle trees): libtorrent 2.x only; lets hosts "
                "with trust_torrent_root skip the whole-image re-read.",
            ),
            (
                "hybrid",
                "Both in one torrent: libtorrent 2.x joins by either hash, but every "
                "piece is hashed twice, hosts always re-read the image (a piece may pass "
                "on its SHA-1 alone), and aria2 and transmission 3.x cannot use it.",
            ),
        ],
        help="Format of the torrents 'nova-torrent-images publish' builds. v2, the "
        "default, is as fast as v1 when hosts verify the whole image and the fastest when "
        "they may trust the torrent root; choose v1 only if clients other than libtorrent "
        "2.x must join the swarms. Changing it "
        "makes the next publish of an image build and advertise a new torrent (the image "
        "is read from Glance again). See the origin documentation for measurements and "
        "which clients read which format.",
    ),
]

seeder_opts = [
    cfg.IntOpt(
        "origin_upload_rate_limit",
        default=65536,
        min=0,
        help="Upload limit of the origin seeder in KiB/s over all images; 0 means "
        "unlimited. A capped origin makes compute hosts take most pieces from each other: "
        "the origin then sends little more than one copy of an image however many hosts "
        "fetch it. The default is 64 MiB/s (about 540 Mbit/s).",
    ),
    cfg.StrOpt(
        "origin_super_seeding",
        default="auto",
        ignore_case=True,
        choices=[
            (
                "auto",
                "on when the node serves no stripes (origin_stripe_listen unset), off when "
                "it does: this project's hosts then fetch the stripes and keep off the "
                "BitTorrent port, whose only users are other clients",
            ),
            ("true", "always on"),
            ("false", "always off"),
        ],
        help="Initial seeding (libtorrent super-seeding) on the origin's BitTorrent port: "
        "each peer is offered pieces nobody has yet, so each piece leaves the origin about "
        "once. It costs time: libtorrent 2.x reveals the first piece to a new connection "
        "only on its 10-second timer, then one piece at a time (a lone aria2c took 14.7 s "
        "for a 32 MiB image with it, 4.2 s without).",
    ),
    cfg.BoolOpt(
        "origin_web_seed",
        default=False,
        help="Let the origin seeder, and only it, use Glance's /v2/images/<id>/file URL "
        "as a web seed when the data of a published image is missing from its registry "
        "(lost disk, new node sharing the registry). Compute hosts never get this URL. "
        "Needs glance_endpoint, and a Glance that serves image data without a token "
        "(noauth, or an internal endpoint that trusts the network): a web seed cannot "
        "send a Keystone token.",
    ),
    cfg.IntOpt(
        "origin_check_interval",
        default=300,
        min=0,
        help="Seconds between the origin seeder's checks of every published image against "
        "Glance: images deleted, deactivated or replaced (other size or hash) in Glance, "
        "or whose magnet no longer names the published torrent, are unpublished and no "
        "longer seeded. 0 disables the check.",
    ),
    cfg.IntOpt(
        "origin_stats_interval",
        default=60,
        min=0,
        help="Seconds between the origin seeder's statistics log lines (images seeded, "
        "peers, upload rate and totals). 0 disables them.",
    ),
    cfg.StrOpt(
        "origin_metrics_listen",
        help="host:port on which the origin seeder serves its Prometheus metrics at "
        "/metrics, e.g. 10.20.0.5:9471. Only that address is bound: use the node's "
        "management address, not 0.0.0.0, unless every network may read it. Unset: no "
        "metrics endpoint.",
    ),
]

stripe_opts = [
    cfg.StrOpt(
        "origin_stripe_listen",
        help="host:port where the origin seeder serves stripes over HTTP: the .torrent, "
        "byte ranges of published images, and the dispenser that gives each compute host "
        "pieces nobody else has yet, so each piece leaves the origin about once. Only "
        "allowed_peer_cidrs may connect. Unset: no stripes; hosts use BitTorrent alone.",
    ),
    cfg.ListOpt(
        "origin_stripe_advertise",
        default=[],
        help="Stripe URLs (http://address:port) of every origin node, written into the "
        "stripes property of published images, in the same order on every node. Empty: "
        "this node's origin_stripe_listen address, when it is a specific address.",
    ),
    cfg.IntOpt(
        "origin_stripe_batch",
        default=1024,
        min=16,
        help="KiB of pieces one stripe request hands out (whole pieces, at least one).",
    ),
    cfg.FloatOpt(
        "origin_stripe_reissue_after",
        default=5.0,
        min=0.0,
        help="Seconds after which a piece handed out may be handed out again to a host "
        "that still lacks it once its swarm went quiet (the first host died or stalls).",
    ),
    cfg.IntOpt(
        "origin_stripe_rate_limit",
        default=0,
        min=0,
        help="Upload limit of the stripe server in KiB/s; 0 means origin_upload_rate_limit "
        "(the stripes and the BitTorrent port each keep to it).",
    ),
    cfg.IntOpt(
        "origin_stripe_connections_per_address",
        default=16,
        min=1,
        help="Connections one client address may hold open to the stripe server; more are "
        "answered 503. A host uses 3 per origin node; raise it for a caching proxy or NAT "
        "in front of this node, whose hosts all share its address.",
    ),
    cfg.IntOpt(
        "origin_stripe_max_connections",
        default=512,
        min=1,
        help="Requests the stripe server serves at once (a worker thread each, started as "
        "needed); a complete request beyond them is answered 503. Connections that are "
        "idle or still sending their request do not count: up to 4 times this many may "
        "be open (at most half the process's file-descriptor limit, RLIMIT_NOFILE), and "
        "when all are, the one silent longest is closed to make room for a new one.",
    ),
    cfg.FloatOpt(
        "origin_stripe_request_timeout",
        default=10.0,
        min=0.1,
        help="Seconds a client has from the first byte of a request (on a new connection: "
        "from its opening) to the end of its body; a slower one is disconnected (a "
        "slowloris or a connection that sends nothing holds its descriptor no longer).",
    ),
    cfg.FloatOpt(
        "origin_stripe_send_timeout",
        default=10.0,
        min=0.1,
        help="Seconds a client has to read an answer, until its system acknowledged the "
        "last byte, and a second more per MiB of it (the stripe server's own waits for "
        "its upload limit do not count). A client that reads slower, or not at all, is "
        "disconnected, the pieces it was given go to the next host that asks, and it gets "
        "no stripes for ten times origin_stripe_reissue_after (the swarm serves it).",
    ),
    cfg.IntOpt(
        "origin_stripe_held_per_address",
        default=0,
        min=0,
        help="MiB of pieces one client address may hold without having asked for their "
        "data; its further stripe requests get nothing until it does. 0: an eighth of "
        "the image, at most 64 MiB. Pieces it leaves unasked for "
        "origin_stripe_reissue_after go to other hosts, and it gets no stripes for ten "
        "times that. Raise it for a caching proxy in front of this node: the origin sees "
        "all the hosts behind it as one address.",
    ),
]

tracker_opts = [
    cfg.StrOpt(
        "tracker_whitelist_path",
        help="opentracker whitelist file (one 40-hex info-hash per line) that publish and "
        "unpublish rewrite with the info-hashes of every published image, e.g. "
        "/etc/opentracker/whitelist.txt on Debian. The file belongs to nova-torrent-images: "
        "entries written by hand are replaced. Unset: no whitelist is written.",
    ),
    cfg.StrOpt(
        "tracker_pidfile",
        help="Pid file of the opentracker process that reads tracker_whitelist_path; "
        "after a change it is sent SIGHUP to reload the whitelist. opentracker writes no "
        "pid file itself: have its service manager write one. Unset: no reload is "
        "signalled (opentracker reads the file again only on restart).",
    ),
]

promotion_opts = [
    cfg.BoolOpt(
        "promotion_enabled",
        default=False,
        help="Publish popular images automatically: an image requested "
        "promotion_threshold times within promotion_window minutes is published and "
        "marked is_torrentable=true.",
    ),
    cfg.StrOpt(
        "promotion_source",
        default="notifications",
        choices=[
            (
                "notifications",
                "Count Glance's image.send notifications (one per image download from "
                "Glance), consumed by the origin seeder from the message bus.",
            ),
            (
                "handler",
                "Count the calls the image handler makes to "
                "nova_torrent_images.origin.promotion.record_request() in the process "
                "that makes them; that process must reach origin_state_dir and may update "
                "Glance images (single-node and edge deployments).",
            ),
        ],
        help="Where the request count of promotion comes from. Only one source counts, so "
        "no request is counted twice.",
    ),
    cfg.IntOpt(
        "promotion_threshold",
        default=10,
        min=1,
        help="Requests within promotion_window minutes that make an image popular.",
    ),
    cfg.IntOpt(
        "promotion_window",
        default=10,
        min=1,
        help="Length in minutes of the sliding window in which requests are counted.",
    ),
    cfg.ListOpt(
        "promotion_notification_topics",
        default=["notifications"],
        help="oslo.messaging topics Glance sends its notifications to (Glance's "
        "[oslo_messaging_notifications] topics).",
    ),
    cfg.StrOpt(
        "promotion_notification_exchange",
        default="glance",
        help="oslo.messaging exchange of Glance's notifications (Glance's control_exchange, "
        "'glance' unless changed there).",
    ),
    cfg.StrOpt(
        "promotion_notification_pool",
        help="Listener pool (queue) of the origin seeder's notification listener. A pool "
        "of its own means other consumers of Glance notifications (Ceilometer, ...) still "
        "receive every message. Default: nova-torrent-images-<host name>, so each origin "
        "node counts every download and publishes (and seeds) a popular image itself; the "
        "nodes publish the same magnet when they share origin_trackers and "
        "origin_advertise_addresses.",
    ),
    cfg.BoolOpt(
        "origin_publish_on_activate",
        default=False,
        help="Publish an image when Glance notifies image.activate and unpublish it on "
        "image.delete, through the origin seeder's notification listener (the topics, "
        "exchange and pool of promotion_notification_*; Glance must send notifications "
        "to the seeder's [DEFAULT] transport_url). Images that cannot be published (not "
        "raw, no os_hash_value, is_torrentable=false set by their owner) are logged and "
        "skipped. With several origin nodes each has a pool of its own by default and "
        "publishes the image itself; they produce the same torrent and leave Glance as "
        "the first one set it when their settings agree. Images uploaded before it was "
        "turned on are published with 'nova-torrent-images publish'.",
    ),
    cfg.IntOpt(
        "origin_publish_workers",
        default=1,
        min=1,
        max=16,
        help="Images published at a time on activation (origin_publish_on_activate): "
        "each reads its image from Glance once. One image is published by one worker at "
        "a time; up to 1024 images wait, further activations are dropped and logged.",
    ),
]

ALL_OPTS = publish_opts + seeder_opts + stripe_opts + tracker_opts + promotion_opts


def register_opts(conf: cfg.ConfigOpts) -> None:
    """Register this module's options in ``[torrent_images]`` of ``conf`` (idempotent)."""
    groups.register(conf, ALL_OPTS)
