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

"""``nova-torrent-compute``: nova-compute whose torrentable images come through the swarm.

Nova 34 has no plug-in point for image downloads (see
:mod:`nova_torrent_images.virt.libvirt.download`), so this launcher *is* nova-compute
with one addition: it imports Nova's own ``nova.cmd.compute``, registers the
``[torrent_images]`` options on Nova's ``CONF``, wraps Nova's Glance download, and runs
Nova's ``main()``. It therefore takes exactly nova-compute's arguments and reads the same
configuration files; put ``[torrent_images]`` into nova.conf (or a file passed with another
``--config-file``). Run it instead of ``nova-compute`` (e.g. in the systemd unit).

Eventlet or native threads: Nova decides, not this launcher, at the moment
``nova.cmd.compute`` is imported (``monkey_patch.patch(backend='threading')``):

1. environment ``OS_NOVA_DISABLE_EVENTLET_PATCHING``: ``1``/``true``/``yes`` selects native
   threads, any other non-empty value eventlet;
2. otherwise ``[DEFAULT] concurrency_backend`` (``auto``, ``threading``, ``eventlet``), read
   early from the ``--config-file``/``--config-dir`` arguments;
3. ``auto`` (the default) is nova-compute's default in Nova 34: native threading.

That import is the first statement of this module, as in Nova's own script, so eventlet's
monkey patching (when chosen) happens before anything of this library creates a lock or a
thread; in native-threading mode Nova forbids importing eventlet later, and this library
never imports it.
"""

# Nova's concurrency choice (and eventlet's monkey patching) must come first; see above.
from nova.cmd import compute as nova_compute

# isort: split

import functools
from typing import Any

import nova.conf
from nova import service as nova_service
from oslo_config import cfg
from oslo_log import log as logging

from nova_torrent_images import conf as nti_conf
from nova_torrent_images.virt.libvirt import download as glance_download
from nova_torrent_images.virt.xenapi import nova_loader as nova_xenapi

LOG = logging.getLogger(__name__)

_STARTS_BEFORE_SERVING = "_nova_torrent_images_start"


def prepare(conf: cfg.ConfigOpts | None = None) -> glance_download.TorrentDownloads:
    """Register the options on Nova's CONF and install the download hook.

    With a Nova that carries the XenAPI driver, also make ``[xenserver] image_handler =
    torrent`` load this library's handler (:mod:`..nova_hooks.xenapi`).

    Nothing reads the options yet: Nova parses its configuration (with ours in it) in its
    ``main()``, and the hook reads them at its first use.
    """
    conf = nova.conf.CONF if conf is None else conf
    nti_conf.register_opts(conf)
    if nova_xenapi.available():  # Nova of Queens to Ussuri: [xenserver] image_handler
        nova_xenapi.install(conf)
    return glance_download.install(conf)


def _start_before_serving() -> None:
    """Recover and resume seeding once Nova has parsed its configuration and set up logging.

    Otherwise a restarted host would seed its base copies again only at its next download.
    Nova's main() calls ``nova.service.serve`` right after its setup; nova-compute never
    forks workers (``no_fork=True``), so libtorrent's threads may start before it.
    """
    original = nova_service.serve
    if getattr(original, _STARTS_BEFORE_SERVING, False):
        return

    @functools.wraps(original)
    def serve(*args: Any, **kwargs: Any) -> Any:
        hook = glance_download.installed()
        if hook is not None:
            try:
                hook.start()
            except Exception:  # noqa: BLE001  seeding must not keep nova-compute down
                LOG.exception(
                    "nova-torrent-images could not resume seeding; it retries at the next "
                    "download of a torrentable image, which falls back to Glance if needed"
                )
        return original(*args, **kwargs)

    setattr(serve, _STARTS_BEFORE_SERVING, True)
    nova_service.serve = serve


def main() -> Any:
    """``nova-torrent-compute [nova-compute arguments]``."""
    prepare()
    _start_before_serving()
    return nova_compute.main()
