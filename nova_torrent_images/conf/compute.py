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

"""Options of the compute side: which images go peer to peer, fetching, the local store.

* ``policy_opts`` -- which images are delivered peer to peer, and by which image handler;
* ``fetch_opts`` -- timeouts, fallback to Glance and verification of a download;
* ``seeding_opts`` -- seeding after a download and the store of base copies;
* ``qos_opts`` -- fair share for guests: CPU and I/O priority, cgroup limits.

The libtorrent session (:mod:`.swarm`), XenServer (:mod:`.xenapi`) and the Glance client
(:mod:`.glance`) have modules of their own.
"""

from __future__ import annotations

from oslo_config import cfg

from nova_torrent_images.conf import groups

policy_opts = [
    cfg.StrOpt(
        "mode",
        default="some",
        choices=[
            ("none", "Never use torrents; every image comes from Glance over HTTP."),
            ("some", "Use torrents only for images whose is_torrentable property is true."),
            (
                "all",
                "Use torrents for every image carrying a torrent magnet, unless its "
                "is_torrentable property is explicitly false.",
            ),
        ],
        help="Which images are delivered peer to peer.",
    ),
    cfg.StrOpt(
        "torrentable_property",
        default="is_torrentable",
        help="Glance image property that marks an image for torrent delivery. Its value "
        "must be true or false; anything else is reported and treated as not torrentable.",
    ),
    cfg.StrOpt(
        "magnet_property",
        default="torrent_magnet",
        help="Glance image property holding the magnet URI of the image's torrent.",
    ),
    cfg.StrOpt(
        "bound_hash_property",
        default="torrent_bound_hash",
        help="Glance image property in which the publisher binds Glance's hash to the v2 "
        "info-hash of the torrent it built from the same verified bytes, as "
        "<os_hash_algo>:<os_hash_value>:<v2 info-hash>. Written by 'nova-torrent-images "
        "publish' for v2 torrents (not v1 or hybrid ones); used by compute hosts only when "
        "trust_torrent_root is on.",
    ),
    cfg.IntOpt(
        "min_torrent_image_size",
        default=0,
        min=0,
        help="Images smaller than this many MiB are always fetched from Glance over HTTP: "
        "joining a swarm costs more than it saves for tiny images.",
    ),
    cfg.StrOpt(
        "image_handler",
        default="torrent",
        help="Name of the image handler this library's own launchers (the command line, "
        "the demo) load from the nova_torrent_images.image_handlers entry point namespace "
        "('torrent' or 'glance'). Nova's XenAPI driver chooses with its own "
        "[xenserver] image_handler = torrent instead.",
    ),
    cfg.StrOpt(
        "nova_vhd_image_handler",
        default="direct_vhd",
        help="With [xenserver] image_handler = torrent, the Nova image handler (a name "
        "Nova's [xenserver] image_handler takes: direct_vhd, vdi_local_dev, "
        "vdi_remote_stream) that handles vhd images, which this library does not write "
        "into VDIs. Raw images, and every snapshot upload, go through this library.",
    ),
]

fetch_opts = [
    cfg.IntOpt(
        "metadata_timeout",
        default=60,
        min=1,
        help="Give up on the swarm if no peer sends the torrent metadata within this many "
        "seconds (no peers at all ends here).",
    ),
    cfg.IntOpt(
        "stall_timeout",
        default=60,
        min=1,
        help="Seconds without progress after which the swarm is stalled: the missing pieces "
        "are then filled in from Glance (when Glance is a source and fallback_to_glance is "
        "on), and if that makes no progress either, the download falls back. A dead origin "
        "is noticed without waiting for this (doc/source/operator-guide.rst).",
    ),
    cfg.IntOpt(
        "overall_timeout",
        default=3600,
        min=1,
        help="Give up on the swarm if the whole download takes longer than this many seconds.",
    ),
    cfg.BoolOpt(
        "fallback_to_glance",
        default=True,
        help="When the swarm fails, download the image from Glance over HTTP instead "
        "(verified like any download). When false, the failure is raised to Nova.",
    ),
    cfg.BoolOpt(
        "verify_image_hash",
        default=True,
        help="Check downloaded bytes against Glance's os_hash_value (or checksum) before "
        "handing the image on. Torrent piece hashes are always checked by libtorrent; "
        "turn this off only to save the extra read of the image.",
    ),
    cfg.BoolOpt(
        "trust_torrent_root",
        default=False,
        help="Skip the whole-image hash check after a swarm download when it proves "
        "nothing new: the magnet names a v2 torrent and nothing else (libtorrent passed "
        "every piece on its SHA-256 Merkle tree) and the image's bound_hash_property says "
        "the publisher built exactly that torrent from bytes it verified against the "
        "os_hash_value Glance has now. This trusts whoever may write the torrent "
        "properties (magnet_property, bound_hash_property): turn it on only when Glance "
        "property protections restrict them to the publisher's role. v1 and hybrid "
        "torrents (whose pieces may pass on SHA-1) are never trusted; they, and any image "
        "whose properties do not match, are verified as usual. Glance downloads are "
        "always verified.",
    ),
    cfg.IntOpt(
        "offline_boot_max_age",
        default=604800,
        min=0,
        help="While Glance is unreachable, boot an image from its verified base copy on "
        "this host, using the Glance record kept with it, if the copy was verified at most "
        "this many seconds ago. Only projects Glance showed the image to (its owner, any "
        "project for public and community images) may boot it this way. 0 disables "
        "boots without Glance.",
    ),
    cfg.IntOpt(
        "progress_interval",
        default=10,
        min=1,
        help="Seconds between progress log lines of a running download.",
    ),
    cfg.StrOpt(
        "state_dir",
        default="/var/lib/nova-torrent-images",
        help="Directory for this library's own state (torrent files, resume data, locks).",
    ),
]

seeding_opts = [
    cfg.IntOpt(
        "seed_duration",
        default=86400,
        min=0,
        help="Keep seeding a base copy for this many seconds after its last use (a boot "
        "or clone). 0 means this host never seeds: it only downloads.",
    ),
    cfg.IntOpt(
        "max_seeds",
        default=20,
        min=0,
        help="Most images this host seeds at once; beyond it the least recently used "
        "base copy stops seeding (it stays on disk for clones).",
    ),
    cfg.IntOpt(
        "base_copy_max_age",
        default=0,
        min=0,
        help="Delete base copies unused for this many seconds; 0 keeps them until space "
        "runs short.",
    ),
    cfg.IntOpt(
        "eviction_usage_window",
        default=7 * 24 * 3600,
        min=0,
        help="Seconds of use that weigh in eviction: when base copies must go (store_quota, "
        "store_free_space_floor), unused ones with the fewest boots and downloads in this "
        "window go first, the least recently used first among equals, so a busy host keeps "
        "the image most of its instances came from. 0: least recently used only.",
    ),
    cfg.IntOpt(
        "store_quota",
        default=0,
        min=0,
        help="Most MiB the base copies of this library may take in the store; least "
        "recently used unused base copies are evicted beyond it. 0 means no quota.",
    ),
    cfg.IntOpt(
        "store_free_space_floor",
        default=0,
        min=0,
        help="Evict least recently used unused base copies when the store's free space "
        "would drop below this many MiB. 0 disables the floor.",
    ),
    cfg.IntOpt(
        "max_concurrent_downloads",
        default=2,
        min=1,
        help="Most image downloads a host runs at once; further requests wait in arrival "
        "order and say so in the log.",
    ),
    cfg.IntOpt(
        "prune_interval",
        default=600,
        min=0,
        help="Seconds between runs of the expiry and eviction policy in a long-running "
        "process (0: only around downloads and on 'nova-torrent-images prune').",
    ),
    cfg.StrOpt(
        "store",
        choices=[
            ("filesystem", "Base copies are files in image_cache_dir (libvirt hosts)."),
            ("xenapi", "Base copies are VDI snapshots in an SR (XenServer hosts)."),
        ],
        help="The store the command line tools operate on. Unset: commands that need a "
        "store fail with a clear message.",
    ),
    cfg.StrOpt(
        "image_cache_dir",
        default="$state_dir/images",
        help="Directory of the filesystem store (base copies and their sidecar files). "
        "Put it on the filesystem of Nova's image cache so links and reflinks work.",
    ),
    cfg.StrOpt(
        "metrics_textfile",
        help="File the compute host's Prometheus metrics are written to, in the text "
        "format, for node_exporter's textfile collector: a path ending in .prom in its "
        "--collector.textfile.directory, e.g. "
        "/var/lib/prometheus/node-exporter/nova_torrent_images.prom. Written atomically by "
        "the long-running process (nova-compute) after every image request and at every "
        "prune_interval; the nova user must be able to write the directory. Unset: no file "
        "is written.",
    ),
    cfg.BoolOpt(
        "differential_snapshots",
        default=False,
        help="Upload a snapshot of an instance whose disk is a clone of a base copy of "
        "image P (on libvirt: a qcow2 overlay of it, or P is the record's base_image_ref, "
        "and a Glance client of this library's own is configured) as a qcow2 overlay "
        "holding only the clusters that differ from P, with the "
        "image properties nti_parent_image, nti_whole_size and nti_whole_hash "
        "(doc/source/snapshots.rst). Restores then need P (and its parents) on the "
        "restoring host; consumers that do not know chains need 'nova-torrent-images "
        "export'. Off: snapshots are uploaded whole (raw on XenServer, Nova's format on "
        "libvirt).",
    ),
]

qos_opts = [
    cfg.IntOpt(
        "qos_nice",
        default=10,
        min=0,
        max=19,
        help="Nice value of the threads that download, verify and seed images (libtorrent's "
        "threads, the stripe worker, a download's hash check), so guests' vCPUs come first. "
        "0 leaves the nice value alone.",
    ),
    cfg.StrOpt(
        "qos_io_class",
        default="best-effort",
        choices=[
            ("best-effort", "Best-effort class, lowest level (7): below guests' default I/O."),
            ("idle", "Idle class: image I/O only when no one else uses the disk."),
            ("none", "Leave the I/O priority alone."),
        ],
        help="I/O priority (ioprio_set) of the same threads; honoured by the BFQ and CFQ "
        "I/O schedulers, not by mq-deadline or none.",
    ),
    cfg.StrOpt(
        "qos_cgroup",
        help="The cgroup v2 directory nova-compute runs in (absolute, or relative to "
        "/sys/fs/cgroup, e.g. system.slice/nova-compute.service); cpu.weight and io.max "
        "are written there at start. Unset: no cgroup is touched.",
    ),
    cfg.IntOpt(
        "qos_cpu_weight",
        default=50,
        min=0,
        max=10000,
        help="cpu.weight written into qos_cgroup (cgroup default 100; lower yields to "
        "guests). 0: not written.",
    ),
    cfg.IntOpt(
        "qos_disk_write_limit",
        default=0,
        min=0,
        help="Disk write ceiling in KiB/s for qos_cgroup: io.max 'wbps' on the block device "
        "of the store. libtorrent has no disk write rate limit of its own; without this its "
        "writes are bounded by download_rate_limit only. 0: no ceiling.",
    ),
]

ALL_OPTS = policy_opts + fetch_opts + seeding_opts + qos_opts


def register_opts(conf: cfg.ConfigOpts) -> None:
    """Register this module's options in ``[torrent_images]`` of ``conf`` (idempotent)."""
    groups.register(conf, ALL_OPTS)
