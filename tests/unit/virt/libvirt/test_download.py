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

"""The libvirt hook's decisions that need no services: when Nova keeps its own path."""

from __future__ import annotations

import datetime
import os

import pytest

pytest.importorskip("nova")

import nova.conf  # noqa: E402
from nova.image import glance as nova_glance  # noqa: E402

from nova_torrent_images.testing.swarm import make_conf  # noqa: E402
from nova_torrent_images.virt.libvirt import download as glance_download  # noqa: E402

HASH = "ab" * 64
MAGNET = "magnet:?xt=urn:btih:" + "c" * 40


def nova_image_dict(**properties: str) -> dict:
    """What ``GlanceImageServiceV2.show()`` returns for a Glance 33 image (checked there)."""
    return {
        "id": "6d7b2f0e-0000-4000-8000-000000000001",
        "name": "cirros",
        "status": "active",
        "size": 1048576,
        "checksum": "0" * 32,
        "os_hash_algo": "sha512",
        "os_hash_value": HASH,
        "os_hidden": False,
        "disk_format": "qcow2",
        "container_format": "bare",
        "min_disk": 0,
        "min_ram": 0,
        "owner": None,
        "stores": "fs",
        "is_public": True,
        "deleted": False,
        "deleted_at": None,
        "created_at": datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC),
        "updated_at": datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC),
        "properties": properties,
    }


def test_image_from_nova_flattens_properties():
    conf = make_conf()
    image = glance_download.image_from_nova(
        nova_image_dict(is_torrentable="true", torrent_magnet=MAGNET), conf
    )
    assert (image.is_torrentable, image.magnet_uri, image.size) == (True, MAGNET, 1048576)
    assert (image.hash_algo, image.hash_value, image.disk_format) == ("sha512", HASH, "qcow2")


def test_image_from_nova_finds_hash_under_properties():
    # A Glance whose image schema lacks os_hash_* makes Nova file them under properties.
    meta = nova_image_dict(os_hash_algo="sha512", os_hash_value=HASH)
    del meta["os_hash_algo"], meta["os_hash_value"]
    image = glance_download.image_from_nova(meta, make_conf())
    assert (image.hash_algo, image.hash_value) == ("sha512", HASH)


def test_image_from_nova_uses_configured_property_names():
    conf = make_conf(torrentable_property="p2p", magnet_property="p2p_magnet")
    image = glance_download.image_from_nova(
        nova_image_dict(p2p="false", p2p_magnet=MAGNET, is_torrentable="true"), conf
    )
    assert image.is_torrentable is False and image.magnet is not None


@pytest.fixture
def glance_overrides():
    conf = nova.conf.CONF
    set_names = []

    def override(name, value):
        conf.set_override(name, value, group="glance")
        set_names.append(name)

    yield override
    for name in set_names:
        conf.clear_override(name, group="glance")


def test_swarm_path_only_for_new_or_regular_destination_files(tmp_path):
    assert glance_download._swarm_refusal(None, str(tmp_path / "new.part"), None) is None
    existing = tmp_path / "stale.part"
    existing.write_bytes(b"x")
    assert glance_download._swarm_refusal(None, str(existing), None) is None
    assert "streams" in glance_download._swarm_refusal(None, None, None)
    assert "streams" in glance_download._swarm_refusal(object(), str(existing), None)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert "not a regular file" in glance_download._swarm_refusal(None, str(fifo), None)
    link = tmp_path / "link"
    link.symlink_to(existing)
    assert "not a regular file" in glance_download._swarm_refusal(None, str(link), None)


def test_signature_verification_stays_with_nova(tmp_path, glance_overrides):
    dst = str(tmp_path / "x.part")
    assert "signature" in glance_download._swarm_refusal(None, dst, ["cert-id"])
    glance_overrides("verify_glance_signatures", True)
    assert "signature" in glance_download._swarm_refusal(None, dst, None)


def test_default_trusted_certificates_stay_with_nova(tmp_path, glance_overrides):
    dst = str(tmp_path / "x.part")
    glance_overrides("enable_certificate_validation", True)
    assert glance_download._swarm_refusal(None, dst, None) is None  # no default certs
    glance_overrides("default_trusted_certificate_ids", ["cert-id"])
    assert "signature" in glance_download._swarm_refusal(None, dst, None)


def test_install_is_idempotent_and_uninstall_restores_nova():
    original = nova_glance.GlanceImageServiceV2.download
    conf = make_conf()
    try:
        first = glance_download.install(conf)
        wrapped = nova_glance.GlanceImageServiceV2.download
        assert wrapped is not original
        assert glance_download.install(conf) is first
        assert nova_glance.GlanceImageServiceV2.download is wrapped  # not wrapped twice
        other = glance_download.install(make_conf())
        assert other is not first and glance_download.installed() is other
        assert nova_glance.GlanceImageServiceV2.download is wrapped
    finally:
        glance_download.uninstall()
    assert nova_glance.GlanceImageServiceV2.download is original
    assert glance_download.installed() is None
