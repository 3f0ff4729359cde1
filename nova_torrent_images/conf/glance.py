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

"""Options of the Glance client: endpoint and timeout in ``[torrent_images]``, Keystone.

The Keystone credentials and session settings are keystoneauth's standard options, in
their own group ``[torrent_images_glance]``.
"""

from __future__ import annotations

from keystoneauth1 import loading as ks_loading
from oslo_config import cfg

from nova_torrent_images.conf import groups

glance_opts = [
    cfg.URIOpt(
        "glance_endpoint",
        schemes=["http", "https"],
        help="Glance API endpoint this library talks to (the XenAPI image handlers, the "
        "command line tools, the origin seeder). Inside nova-compute the request's token is "
        "used against it; when unset, the endpoint comes from the Keystone catalog through "
        "the [torrent_images_glance] credentials. On libvirt hosts downloads use Nova's own "
        "Glance client; snapshots through this library (differential, queued while Glance "
        "is down) and restores of differential images need this one "
        "(doc/source/snapshots.rst).",
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
        help="Timeout in seconds of one Glance HTTP request for image data (downloads, "
        "uploads) and property changes. An image's record has its own, shorter timeouts "
        "(glance_connect_timeout, glance_read_timeout, glance_metadata_budget).",
    ),
    cfg.FloatOpt(
        "glance_connect_timeout",
        default=5.0,
        min=0.1,
        help="Seconds to connect to Glance for an image's record (a boot's metadata call). "
        "Image data and uploads use glance_timeout.",
    ),
    cfg.FloatOpt(
        "glance_read_timeout",
        default=10.0,
        min=0.1,
        help="Seconds Glance may take to answer an image's record, and between bytes of the "
        "answer. A Glance that accepts connections and never answers fails within "
        "glance_connect_timeout + glance_read_timeout.",
    ),
    cfg.FloatOpt(
        "glance_metadata_budget",
        default=15.0,
        min=0.1,
        help="Seconds for the record of one boot, retries included: no retry starts that "
        "could not end within it. A boot that gets no record in time goes on as while "
        "Glance is down: a verified base copy on this host may stand in, within "
        "offline_boot_max_age and for the projects Glance showed the image to.",
    ),
    cfg.IntOpt(
        "glance_retries",
        default=3,
        min=0,
        help="How many times a Glance request that failed transiently (HTTP 5xx, 408, 429, "
        "a refused or reset connection, a timeout, a truncated download) is retried before "
        "the error is raised; the attempts of one download share this budget. Other errors "
        "(404, 401/403, other 4xx, a wrong hash) are never retried.",
    ),
    cfg.FloatOpt(
        "glance_retry_delay",
        default=1.0,
        min=0.0,
        help="Seconds to wait before the first retry of a Glance request; each further "
        "retry waits twice as long (at most 60 seconds). A random part of up to half this "
        "delay is added to every wait, so that hosts which failed together do not retry "
        "together.",
    ),
]

ALL_OPTS = glance_opts


def keystone_opts() -> list[cfg.Opt]:
    """keystoneauth's session and auth options, as registered in ``[torrent_images_glance]``."""
    return ks_loading.get_session_conf_options() + ks_loading.get_auth_common_conf_options()


def register_opts(conf: cfg.ConfigOpts) -> None:
    """Register this module's options on ``conf``, both groups (idempotent)."""
    groups.register(conf, ALL_OPTS)
    ks_loading.register_session_conf_options(conf, groups.GLANCE_GROUP)
    ks_loading.register_auth_conf_options(conf, groups.GLANCE_GROUP)
