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

"""Configuration options, groups ``[torrent_images]`` and ``[torrent_images_glance]``.

The options can be registered on any ``ConfigOpts`` (Nova's ``CONF`` included) with
:func:`register_opts`; ``list_opts`` feeds ``oslo-config-generator`` and the sphinx sample.
Sizes are in bytes or MiB as the name says, rates in KiB/s, times in seconds.

As in nova/conf, the options live in one module per side or topic, and this package
imports and registers them all:

* :mod:`.compute` -- which images go peer to peer, fetching, seeding and the local store;
* :mod:`.swarm` -- the libtorrent session of a host;
* :mod:`.xenapi` -- XenServer hosts;
* :mod:`.glance` -- the Glance client, and keystoneauth in ``[torrent_images_glance]``;
* :mod:`.origin` -- the origin side on Glance API nodes (publish, seed, promote);
* :mod:`.sources` -- the image's own locations and zone caches as sources;
* :mod:`.groups` -- the two group names, and registration in ``[torrent_images]``.

Each topic module has ``ALL_OPTS`` and ``register_opts(conf)``. They all register in
``[torrent_images]``, one group for operators whatever the side; :mod:`.glance` also
registers keystoneauth's options in ``[torrent_images_glance]``. None of them imports
:mod:`nova_torrent_images.origin`: a compute host registers every option without loading
origin code.
"""

from __future__ import annotations

import ipaddress
import urllib.parse

from oslo_config import cfg

from nova_torrent_images import exception
from nova_torrent_images.common import utils
from nova_torrent_images.conf import compute, glance, origin, sources, swarm, xenapi
from nova_torrent_images.conf.groups import GLANCE_GROUP, GROUP, torrent_images_group

__all__ = ["ALL_OPTS", "GLANCE_GROUP", "GROUP", "check", "list_opts", "register_opts"]

_TOPICS = (compute, swarm, xenapi, glance, origin, sources)

# Every [torrent_images] option, in the order of the sample file and the option reference
# (the order from before the split into modules, so the generated sample did not change).
ALL_OPTS = (
    compute.policy_opts
    + swarm.swarm_opts
    + compute.fetch_opts
    + compute.seeding_opts
    + compute.qos_opts
    + xenapi.xenapi_opts
    + glance.glance_opts
    + origin.ALL_OPTS
    + sources.ALL_OPTS
)


def register_opts(conf: cfg.ConfigOpts) -> None:
    """Register every option of this library on ``conf`` (idempotent)."""
    for topic in _TOPICS:
        topic.register_opts(conf)


def load_config_files(config_files: list[str]) -> cfg.ConfigOpts:
    """A new ConfigOpts with this library's options, read from ``config_files`` only.

    No file given: oslo.config's default files (``/etc/nova-torrent-images/...``).
    """
    conf = cfg.ConfigOpts()
    register_opts(conf)
    args = []
    for path in config_files:
        args += ["--config-file", path]
    conf(args, project="nova-torrent-images", default_config_files=None if not config_files else [])
    return conf


def list_opts() -> list[tuple[str | cfg.OptGroup, list[cfg.Opt]]]:
    """Options for ``oslo-config-generator --namespace nova_torrent_images``."""
    return [(torrent_images_group(), ALL_OPTS), (GLANCE_GROUP, glance.keystone_opts())]


def check(conf: cfg.ConfigOpts) -> None:
    """Fail at start-up, with the option's name, on values oslo.config cannot check.

    Otherwise a typo (say a bad CIDR) would only surface at the first download, and every
    download would quietly fall back to Glance.
    """
    opts = conf[GROUP]
    for cidr in opts.allowed_peer_cidrs:
        try:
            ipaddress.ip_network(cidr.strip(), strict=False)
        except ValueError as exc:
            raise exception.ConfigError(option="allowed_peer_cidrs", reason=str(exc)) from exc
    for entry in opts.listen_interfaces:
        # Port 0 asks libtorrent for any free port (simulated hosts and tests use it).
        try:
            utils.parse_listen_address(entry)
        except ValueError as exc:
            raise exception.ConfigError(option="listen_interfaces", reason=str(exc)) from exc
    for url in opts.trackers:
        if urllib.parse.urlsplit(url).scheme not in ("http", "https", "udp"):
            raise exception.ConfigError(
                option="trackers", reason=f"{url!r} is not an http, https or udp URL"
            )
