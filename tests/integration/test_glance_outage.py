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

"""Boots while Glance is down: a verified base copy stands in, for the projects it may.

The XenAPI path is here; the libvirt path is in test_nova_libvirt.py, beside its fixtures.
"""

from __future__ import annotations

import socket
import types

import pytest

from nova_torrent_images import exception
from nova_torrent_images.glance.client import GlanceClient
from nova_torrent_images.virt.xenapi.handler import GlanceImageHandler
from tests.integration.test_xenapi import make_handler, our_vdis, vdi_sha512, xenserver  # noqa: F401

MiB = 1024 * 1024


def dead_endpoint() -> str:
    """An http URL on loopback where nothing listens (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def project(name: str) -> types.SimpleNamespace:
    return types.SimpleNamespace(project_id=name, auth_token=None)


def test_xenapi_boots_a_cached_image_while_glance_is_down(
    xenserver,  # noqa: F811
    make_image,
    hosts,
    glance,
    tmp_path,
):
    fake, session = xenserver
    image = make_image(8 * MiB, visibility="private")
    never_cached = make_image(4 * MiB, name="never-cached")
    compute = hosts("compute-1", glance_retries=1, glance_retry_delay=0.05)
    current = {"glance": glance}
    handler = make_handler(GlanceImageHandler, compute, glance, fake, tmp_path)
    handler._glance_factory = lambda context: current["glance"]
    first = handler.download_image(project("p-1"), session, {"name": "vm-1"}, image.id)
    assert first["root"]["uuid"]

    current["glance"] = GlanceClient.for_endpoint(dead_endpoint(), compute.conf, timeout=2)
    second = handler.download_image(project("p-1"), session, {"name": "vm-2"}, image.id)

    root = second["root"]["uuid"]
    assert root != first["root"]["uuid"]
    assert vdi_sha512(fake, root, image.record["size"]) == image.record["os_hash_value"]
    assert len(our_vdis(fake, "base")) == 1
    # A project Glance never showed the (private) image to gets nothing from the cache.
    with pytest.raises(exception.OfflineBootRefused, match=image.id) as refused:
        handler.download_image(project("p-other"), session, {"name": "vm-3"}, image.id)
    assert "p-other" in str(refused.value)
    # No base copy: a typed error naming the image and the setting.
    with pytest.raises(exception.OfflineBootRefused, match=never_cached.id) as missing:
        handler.download_image(project("p-1"), session, {"name": "vm-4"}, never_cached.id)
    assert "offline_boot_max_age" in str(missing.value)
    assert len(our_vdis(fake, "instance")) == 2  # nothing made for the refused boots


def test_xenapi_offline_boots_respect_the_age_limit(
    xenserver,  # noqa: F811
    make_image,
    hosts,
    glance,
    tmp_path,
):
    fake, session = xenserver
    image = make_image(4 * MiB)
    compute = hosts("compute-1", glance_retries=0, offline_boot_max_age=1)
    current = {"glance": glance}
    handler = make_handler(GlanceImageHandler, compute, glance, fake, tmp_path)
    handler._glance_factory = lambda context: current["glance"]
    handler.download_image(project("p-1"), session, {"name": "vm-1"}, image.id)
    store = handler.pipeline(session).store
    base = store.lookup(image.id)
    # Verified two seconds "ago": older than offline_boot_max_age=1.
    ref = session.call_xenapi("VDI.get_by_uuid", base.ref)
    session.call_xenapi("VDI.remove_from_other_config", ref, "nti_created")
    session.call_xenapi("VDI.add_to_other_config", ref, "nti_created", repr(base.created_at - 2))

    current["glance"] = GlanceClient.for_endpoint(dead_endpoint(), compute.conf, timeout=2)
    with pytest.raises(exception.OfflineBootRefused, match="more than offline_boot_max_age"):
        handler.download_image(project("p-1"), session, {"name": "vm-2"}, image.id)


def test_xenapi_an_image_withdrawn_during_the_outage_is_not_booted_once_glance_returns(
    xenserver,  # noqa: F811
    make_image,
    hosts,
    glance,
    glance_server,
    tmp_path,
):
    """Glance's answer, once it is back, overrides the base copy this host kept."""
    fake, session = xenserver
    deactivated = make_image(4 * MiB, name="deactivated")
    deleted = make_image(4 * MiB, name="deleted")
    compute = hosts("compute-1", glance_retries=0)
    current = {"glance": glance}
    handler = make_handler(GlanceImageHandler, compute, glance, fake, tmp_path)
    handler._glance_factory = lambda context: current["glance"]
    for image in (deactivated, deleted):
        handler.download_image(project("p-1"), session, {"name": "vm"}, image.id)
    current["glance"] = GlanceClient.for_endpoint(dead_endpoint(), compute.conf, timeout=2)
    for image in (deactivated, deleted):  # the outage: both boot from the base copies
        handler.download_image(project("p-1"), session, {"name": "vm"}, image.id)
    instances = len(our_vdis(fake, "instance"))

    # Meanwhile the owner withdrew one and deleted the other; then Glance comes back.
    client = glance_server.client()
    client.images.deactivate(deactivated.id)
    client.images.delete(deleted.id)
    current["glance"] = glance
    with pytest.raises(exception.ImageNotActive, match=deactivated.id) as refused:
        handler.download_image(project("p-1"), session, {"name": "vm"}, deactivated.id)
    assert "deactivated" in str(refused.value)
    with pytest.raises(exception.ImageNotFound, match=deleted.id):
        handler.download_image(project("p-1"), session, {"name": "vm"}, deleted.id)
    assert len(our_vdis(fake, "instance")) == instances  # nothing made for either

    client.images.reactivate(deactivated.id)  # the owner's decision, again honoured
    handler.download_image(project("p-1"), session, {"name": "vm"}, deactivated.id)
    assert len(our_vdis(fake, "instance")) == instances + 1
