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

"""A standard BitTorrent client (Debian's aria2c) fetching from the origin seeder."""

from __future__ import annotations

import hashlib
import os

import pytest

from nova_torrent_images.testing import aria2
from nova_torrent_images.testing.http_origin import HTTPOrigin
from nova_torrent_images.testing.origin_node import start_origin_node
from tests.integration.conftest import require_program

MiB = 1024 * 1024


@pytest.fixture
def aria2c():
    require_program(aria2.find_binary(), "aria2c", "aria2", "standard-client")


def test_a_lone_standard_client_is_served_at_once_by_a_stripe_serving_origin(
    aria2c, tracker, tmp_path
):
    """aria2c fetched a 32 MiB image in 14.7 s when the origin super-seeded its port
    (libtorrent reveals a new connection's first piece on its 10-second timer, then one at
    a time), 4.2 s without; a node that serves stripes leaves its port to such clients."""
    data = os.urandom(32 * MiB)
    (tmp_path / "image.raw").write_bytes(data)
    with HTTPOrigin(str(tmp_path / "glance")) as glance_origin:
        record = glance_origin.create_image(str(tmp_path / "image.raw"))
        node = start_origin_node(
            glance_origin.url,
            str(tmp_path / "origin"),
            upload_kib=0,
            tracker=tracker,
            torrent_format="v1",  # aria2 1.36 reads v1 torrents only
        )
        try:
            assert node.seeder.super_seeding is False
            node.publish(record["id"])
            entry = node.publisher.registry.get(record["id"])
            tracker.wait_allowed(node.publisher.published()[0].tracker_hashes[0], timeout=5)
            torrent = tmp_path / "image.torrent"
            torrent.write_bytes(node.publisher.registry.read_torrent(entry))
            result = aria2.fetch(
                str(torrent), str(tmp_path / "aria2"), tracker=tracker.announce_url
            )
        finally:
            node.stop()
    assert result.returncode == 0, result.log
    with open(result.path, "rb") as f:
        assert hashlib.sha512(f.read()).digest() == hashlib.sha512(data).digest()
    # aria2 itself waits about 2 s (a tracker round and its first connection); the ten
    # seconds of super-seeding would come on top.
    assert result.seconds < 8, f"aria2c took {result.seconds:.1f}s"
