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

"""Child process of test_nova_libvirt: ``nova-torrent-compute`` up to ``service.serve``.

Run as ``python nova_compute_child.py --config-file nova.conf`` (nova-compute's own
arguments). It runs the launcher's real ``main()`` -- Nova's concurrency choice at import,
Nova's config parsing with our options in it, logging, privsep, os-vif -- with only
``Service.create``, ``serve`` and ``wait`` replaced: instead of serving RPC, "serve" downloads
one image through Nova's ``GlanceImageServiceV2.download`` and writes a JSON report to
``$NTI_CHILD_REPORT``. Never import this module in the pytest process: Nova's native
threading mode refuses to start once eventlet was imported there.
"""

# The launcher first, as in the console script: Nova patches (or poisons) eventlet here.
from nova_torrent_images.cmd import compute as launcher

# isort: split

import hashlib
import json
import os
import sys
import threading
import time
from unittest import mock

import nova.conf
from nova import context as nova_context
from nova import monkey_patch
from nova import service as nova_service
from nova.image import glance as nova_glance
from nova.virt.libvirt import imagecache

from nova_torrent_images.virt.libvirt import download as glance_download


class HubTicker:
    """Longest gap between ticks of a 20 ms ticker while the download runs.

    Under eventlet the ticker is a green thread: a gap far above 20 ms means something
    blocked the hub (and with it every other green thread of nova-compute).
    """

    def __init__(self) -> None:
        self.max_gap = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.is_set():
            time.sleep(0.02)
            now = time.monotonic()
            self.max_gap = max(self.max_gap, now - last)
            last = now

    def __enter__(self) -> "HubTicker":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


def cache_images(context: object, image_id: str) -> None:
    """Nova's pre-cache (``openstack aggregate cache image``) as ComputeManager calls it:
    the libvirt driver's ``cache_image``, twice: once to fetch, once when told to (by the
    file ``$NTI_CHILD_RELEASE``), meanwhile seeding as a nova-compute would."""
    from nova.virt.libvirt import driver as libvirt_driver

    driver = object.__new__(libvirt_driver.LibvirtDriver)  # cache_image uses no state
    hook = glance_download.installed()
    report: dict[str, object] = {"first": driver.cache_image(context, image_id)}
    fetched = hook.pipeline().fetches.get(image_id)
    report["fetched"] = None
    if fetched is not None:
        report["fetched"] = {
            "source": fetched.source,
            "peers": fetched.bytes_from_peers,
            "origin": fetched.bytes_from_origin,
            "glance": fetched.bytes_from_glance,
        }
    cache = os.path.join(conf_path("instances_path"), "_base", imagecache.get_cache_fname(image_id))
    with open(cache, "rb") as f:
        report["sha512"] = hashlib.file_digest(f, "sha512").hexdigest()
    report["seeding"] = hook.pipeline().seeds.seeding() if hook.pipeline().seeds else []
    with open(os.environ["NTI_CHILD_REPORT"] + ".cached", "w") as f:
        json.dump(report, f)
    release = os.environ["NTI_CHILD_RELEASE"]
    deadline = time.monotonic() + 300
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.1)
    # Nova touches a cached file through privsep (a root daemon started with sudo): here,
    # the same utime in this process.
    with mock.patch("nova.privsep.path.utime", lambda path: os.utime(path, None)):
        report["second"] = driver.cache_image(context, image_id)
    hook.shutdown()
    with open(os.environ["NTI_CHILD_REPORT"], "w") as f:
        json.dump(report, f)


def conf_path(name: str) -> str:
    return str(getattr(nova.conf.CONF, name))


def fake_serve(server: object, workers: int | None = None, no_fork: bool = False) -> None:
    conf = nova.conf.CONF
    hook = glance_download.installed()
    if os.environ.get("NTI_CHILD_MODE") == "cache_image":
        context = nova_context.RequestContext(
            user_id="nti-child", project_id="nti-child", auth_token="noauth", is_admin=True
        )
        cache_images(context, os.environ["NTI_CHILD_IMAGE_ID"])
        return
    report: dict[str, object] = {
        "patched": monkey_patch.is_patched(),
        "eventlet_imported": "eventlet" in sys.modules,
        "green_threads": "eventlet" in sys.modules
        and __import__("eventlet").patcher.is_monkey_patched("thread"),
        "hook_installed": hook is not None
        and hasattr(nova_glance.GlanceImageServiceV2.download, "_nova_torrent_images_original"),
        "started_before_serving": hook is not None and hook._pipeline is not None,
        "conf_state_dir": conf.torrent_images.state_dir,
        "workers": workers,
        "no_fork": no_fork,
    }
    image_id, dst = os.environ["NTI_CHILD_IMAGE_ID"], os.environ["NTI_CHILD_DST"]
    context = nova_context.RequestContext(
        user_id="nti-child", project_id="nti-child", auth_token="noauth", is_admin=True
    )
    with HubTicker() as ticker:
        started = time.monotonic()
        nova_glance.GlanceImageServiceV2().download(context, image_id, dst_path=dst)
        report["seconds"] = time.monotonic() - started
    report["max_hub_gap"] = ticker.max_gap
    with open(dst, "rb") as f:
        report["sha512"] = hashlib.file_digest(f, "sha512").hexdigest()
    local = hook.pipeline()
    base = local.store.lookup(image_id)
    report["base_ref"] = base.ref if base else None
    report["same_inode"] = bool(base) and os.stat(base.ref).st_ino == os.stat(dst).st_ino
    report["seeding"] = local.seeds.seeding() if local.seeds else []
    hook.shutdown()
    with open(os.environ["NTI_CHILD_REPORT"], "w") as f:
        json.dump(report, f)


def main() -> int:
    with (
        mock.patch.object(nova_service.Service, "create", return_value=object()),
        mock.patch.object(nova_service, "serve", fake_serve),
        mock.patch.object(nova_service, "wait"),
    ):
        launcher.main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
