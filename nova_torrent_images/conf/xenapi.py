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

"""Options of XenServer hosts: the SR, the nova-compute VM and XAPI for the command line."""

from __future__ import annotations

from oslo_config import cfg

from nova_torrent_images.conf import groups

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

ALL_OPTS = xenapi_opts


def register_opts(conf: cfg.ConfigOpts) -> None:
    """Register this module's options in ``[torrent_images]`` of ``conf`` (idempotent)."""
    groups.register(conf, ALL_OPTS)
