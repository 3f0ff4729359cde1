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

"""Child of test_nova_xenapi: Nova 21.2.4's XenAPI loader and call sites with our handler.

Run with the ``PYTHONPATH`` of :mod:`tests.integration.nova_ussuri` as
``python nova_xenapi_child.py <json arguments>``. It does what nova-compute of Ussuri does
with ``[xenserver] image_handler = torrent`` (after ``nova-torrent-compute``'s
registration): parses nova.conf, builds ``VMOps`` (whose ``__init__`` loads the handler
through ``get_image_handler``), and boots through ``vm_utils.create_image`` with the image
type Nova determines. One JSON line per phase goes to stdout; between the first boot and
the rest it waits for a line on stdin (the parent checks the seed meanwhile).

The XenAPI session is os-xenapi's ``XenAPISession`` (as Nova's driver makes it) with two
changes for the fake XAPI: the URL carries a port, and there are no dom0 plugins to ask
for their version.
"""

from __future__ import annotations

import json
import sys
import urllib.parse
import uuid

import nova.conf

from nova_torrent_images.virt.xenapi import nova_loader as nti_xenapi

ARGS = json.loads(sys.argv[1])
CONF = nova.conf.CONF
nti_xenapi.install(CONF)  # what nova-torrent-compute's prepare() does before Nova parses
CONF(["--config-file", ARGS["nova_conf"]], project="nova")

# isort: split

from nova import context as nova_context  # noqa: E402
from nova import exception as nova_exception  # noqa: E402
from nova import objects, rpc  # noqa: E402
from nova.virt.xenapi import vm_utils, vmops  # noqa: E402
from os_xenapi.client import session as xenapi_session  # noqa: E402


class FakeHostSession(xenapi_session.XenAPISession):
    def _get_ip_from_url(self, url: str) -> str:
        return urllib.parse.urlparse(url).hostname

    def _verify_plugin_version(self) -> None:
        pass  # the fake XAPI has no dom0 plugins


def say(**report: object) -> None:
    print(json.dumps(report), flush=True)


def main() -> None:
    objects.register_all()
    rpc.init(CONF)  # VMOps builds a compute API; the fake transport carries nothing
    session = FakeHostSession(
        CONF.xenserver.connection_url,
        CONF.xenserver.connection_username,
        CONF.xenserver.connection_password,
        originator="nova",
        concurrent=2,
    )
    context = nova_context.RequestContext(
        user_id="nti-user", project_id="nti-project", auth_token="noauth", is_admin=True
    )
    ops = vmops.VMOps(session, virtapi=None)  # Nova's loader runs here
    handler = ops.image_handler
    calls: list[str] = []
    original = handler.handler.download_image

    def counted(context, session, instance, image_id):
        calls.append(image_id)
        return original(context, session, instance, image_id)

    handler.handler.download_image = counted

    def boot(image_id: str, disk_format: str = "raw") -> dict:
        instance = objects.Instance(
            id=len(calls) + 1,
            uuid=str(uuid.uuid4()),
            project_id=context.project_id,
            user_id=context.user_id,
            image_ref=image_id,
            system_metadata={},
            flavor=objects.Flavor(root_gb=1, ephemeral_gb=0, swap=0, memory_mb=512, vcpus=1),
        )
        meta = objects.ImageMeta.from_dict(
            {"id": image_id, "disk_format": disk_format, "container_format": "bare"}
        )
        image_type = vm_utils.determine_disk_image_type(meta)
        return vm_utils.create_image(
            context, session, instance, "vm", image_id, image_type, handler
        )

    def vdis() -> int:
        return len(session.call_xenapi("VDI.get_all"))

    pipeline = handler.handler.pipeline(session)
    first = boot(ARGS["image_id"])
    # Nova's own lookup of its image cache VDI, as its next boot of the image does it.
    cache = vm_utils._find_cached_image(session, ARGS["image_id"], vm_utils.safe_find_sr(session))
    say(
        phase="booted",
        handler=f"{type(handler).__module__}.{type(handler).__name__}",
        choice=CONF.xenserver.image_handler,
        root=first["root"]["uuid"],
        nova_cache=session.call_xenapi("VDI.get_uuid", cache) if cache else None,
        source=pipeline.fetches[ARGS["image_id"]].source,
        base=pipeline.store.lookup(ARGS["image_id"]).ref,
        seeding=sorted(pipeline.seeds.seeding()),
    )
    sys.stdin.readline()  # the parent fetched from this host's seed

    second = boot(ARGS["image_id"])
    say(phase="second", root=second["root"]["uuid"], handler_calls=len(calls))

    bad = boot(ARGS["bad_magnet_id"])
    say(
        phase="bad_magnet",
        root=bad["root"]["uuid"],
        source=pipeline.fetches[ARGS["bad_magnet_id"]].source,
    )

    before = vdis()
    errors = {}
    try:
        boot(ARGS["missing_id"])
    except Exception as exc:  # noqa: BLE001  reported to the parent, which asserts on it
        errors["missing"] = type(exc).__name__
    CONF.set_override("glance_endpoint", ARGS["dead_glance"], "torrent_images")
    try:
        boot(ARGS["uncached_id"])
    except nova_exception.NovaException as exc:
        errors["glance_down"] = f"{type(exc).__name__}: {exc}"
    CONF.clear_override("glance_endpoint", "torrent_images")
    say(phase="failures", errors=errors, vdis_before=before, vdis_after=vdis())

    handler.upload_image(
        context, session, {"name": "vm"}, ARGS["snapshot_id"], [first["root"]["uuid"]]
    )
    say(phase="uploaded", kept=pipeline.store.lookup(ARGS["snapshot_id"]) is not None)
    handler.shutdown()
    while not session._sessions.empty():  # noqa: SLF001  log out what os-xenapi logged in
        session._sessions.get().xenapi.session.logout()  # noqa: SLF001


if __name__ == "__main__":
    main()
