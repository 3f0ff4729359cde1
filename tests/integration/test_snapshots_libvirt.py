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

"""libvirt snapshots: Nova's own upload, kept by the saving host, restored without Glance."""

from __future__ import annotations

import hashlib
import os

import pytest

pytest.importorskip("nova")

from nova.image import glance as nova_glance  # noqa: E402

from tests.integration.test_nova_libvirt import (  # noqa: E402, F401
    compute,
    context,
    data_gets,
    nova_cache_path,
    nova_conf,
)

MiB = 1024 * 1024


def test_libvirt_snapshot_is_kept_and_restored_without_glance(
    compute,  # noqa: F811
    nova_conf,  # noqa: F811
    context,  # noqa: F811
    glance_server,
    tmp_path,
):
    host, hook = compute()
    data = os.urandom(4 * MiB + 512)
    snap_file = tmp_path / "snapshot.raw"  # what Nova's snapshot_extract leaves
    snap_file.write_bytes(data)
    client = glance_server.client()
    image_id = client.images.create(name="snap", disk_format="raw", container_format="bare")["id"]
    try:
        service = nova_glance.GlanceImageServiceV2()
        with open(snap_file, "rb") as f:  # as the libvirt driver's snapshot() does
            service.update(
                context,
                image_id,
                {"disk_format": "raw", "container_format": "bare"},
                data=f,
                purge_props=False,
            )
        base = hook.pipeline().store.lookup(image_id)
        assert base is not None and base.hash_value == hashlib.sha512(data).hexdigest()
        assert base.record["id"] == image_id
        os.unlink(snap_file)  # Nova removes its extract; the base copy is the store's own

        dst = nova_cache_path(nova_conf, image_id) + ".part"
        service.download(context, image_id, dst_path=dst)

        with open(dst, "rb") as f:
            assert f.read() == data
        assert data_gets(glance_server, image_id, expect=0) == 0
    finally:
        client.images.delete(image_id)
