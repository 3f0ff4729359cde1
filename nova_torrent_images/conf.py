"""Configuration options, group ``[torrent_images]``.

The options can be registered on any ``ConfigOpts`` (Nova's ``CONF`` included) with
:func:`register_opts`; ``list_opts`` feeds ``oslo-config-generator`` and the sphinx sample.
Sizes are in bytes or MiB as the name says, rates in KiB/s, times in seconds.
"""

from __future__ import annotations

from keystoneauth1 import loading as ks_loading
from oslo_config import cfg

from nova_torrent_images.origin.options import ORIGIN_OPTS

GROUP = "torrent_images"
GLANCE_GROUP = "torrent_images_glance"


def _group() -> cfg.OptGroup:
    # A new OptGroup per ConfigOpts: register_group() copies the group shallowly, so a
    # shared instance would share its option table, and set_override() on one ConfigOpts
    # would leak into every other one.
    return cfg.OptGroup(
        GROUP,
        title="Peer-to-peer delivery of Glance images",
        help="Settings of nova-torrent-images on compute hosts and on the Glance-side seeder.",
    )


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
        help="Name of the image handler the XenAPI integration loads from the "
        "nova_torrent_images.image_handlers entry point namespace ('torrent' or 'glance').",
    ),
]

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
        help="Download limit for the whole host in KiB/s; 0 means unlimited.",
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
        help="Give up on the swarm if the download makes no progress for this many seconds.",
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
]

xenapi_opts = [
    cfg.StrOpt(
        "xenapi_sr_uuid",
        help="uuid of the SR that holds downloads and base copies on a XenServer host. "
        "Default: the pool's default SR.",
    ),
    cfg.StrOpt(
        "xenapi_compute_vm_uuid",
        help="uuid of the VM running nova-compute, which downloads are attached to. "
        "Default: read from /sys/hypervisor/uuid inside that VM.",
    ),
    cfg.URIOpt(
        "xenapi_connection_url",
        schemes=["http", "https"],
        help="XAPI URL for the command line tools (inside nova-compute the driver's own "
        "session is used).",
    ),
    cfg.StrOpt(
        "xenapi_connection_username", default="root", help="XAPI user for the command line tools."
    ),
    cfg.StrOpt(
        "xenapi_connection_password", secret=True, help="XAPI password for the command line tools."
    ),
    cfg.StrOpt(
        "xenapi_device_dir",
        default="/dev",
        help="Directory where plugged VBDs appear as devices (xvdb, xvdc, ...).",
    ),
]

glance_opts = [
    cfg.URIOpt(
        "glance_endpoint",
        schemes=["http", "https"],
        help="Glance API endpoint this library talks to (the XenAPI image handlers, the "
        "command line tools, the origin seeder). Inside nova-compute the request's token is "
        "used against it; when unset, the endpoint comes from the Keystone catalog through "
        "the [torrent_images_glance] credentials. The libvirt integration uses Nova's own "
        "Glance client instead.",
    ),
    cfg.BoolOpt(
        "glance_noauth",
        default=False,
        help="Talk to a Glance API running without Keystone (development and tests).",
    ),
    cfg.IntOpt(
        "glance_timeout",
        default=600,
        min=1,
        help="Timeout in seconds of one Glance HTTP request.",
    ),
]

ALL_OPTS = (
    policy_opts + swarm_opts + fetch_opts + seeding_opts + xenapi_opts + glance_opts + ORIGIN_OPTS
)


def register_opts(conf: cfg.ConfigOpts) -> None:
    """Register every option of this library on ``conf`` (idempotent)."""
    conf.register_group(_group())
    conf.register_opts(ALL_OPTS, group=GROUP)
    ks_loading.register_session_conf_options(conf, GLANCE_GROUP)
    ks_loading.register_auth_conf_options(conf, GLANCE_GROUP)


def list_opts() -> list[tuple[str | cfg.OptGroup, list[cfg.Opt]]]:
    """Options for ``oslo-config-generator --namespace nova_torrent_images``."""
    ks_opts = ks_loading.get_session_conf_options() + ks_loading.get_auth_common_conf_options()
    return [(_group(), ALL_OPTS), (GLANCE_GROUP, ks_opts)]


def check(conf: cfg.ConfigOpts) -> None:
    """Fail at start-up, with the option's name, on values oslo.config cannot check.

    Otherwise a typo (say a bad CIDR) would only surface at the first download, and every
    download would quietly fall back to Glance.
    """
    import ipaddress
    import urllib.parse

    from nova_torrent_images import exception

    opts = conf.torrent_images
    for cidr in opts.allowed_peer_cidrs:
        try:
            ipaddress.ip_network(cidr.strip(), strict=False)
        except ValueError as exc:
            raise exception.ConfigError(option="allowed_peer_cidrs", reason=str(exc)) from exc
    for entry in opts.listen_interfaces:
        host, sep, port = entry.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise exception.ConfigError(
                option="listen_interfaces", reason=f"{entry!r} is not host:port"
            )
    for url in opts.trackers:
        if urllib.parse.urlsplit(url).scheme not in ("http", "https", "udp"):
            raise exception.ConfigError(
                option="trackers", reason=f"{url!r} is not an http, https or udp URL"
            )
