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

"""The embedded origin answers python-glanceclient like Glance does for our calls."""

import hashlib
import io
import os
import time

import pytest
import requests

from nova_torrent_images.glance.client import GlanceClient
from nova_torrent_images.testing.http_origin import HTTPOrigin


@pytest.fixture
def origin(tmp_path):
    with HTTPOrigin(str(tmp_path / "origin")) as server:
        yield server


def test_create_show_update_download(origin, tmp_path):
    data = os.urandom(3 * 1024 * 1024 + 7)
    src = tmp_path / "img"
    src.write_bytes(data)
    record = origin.create_image(str(src), name="cirros")
    glance = GlanceClient.for_endpoint(origin.url)

    info = glance.image_info(record["id"])
    assert info.size == len(data) and info.hash_value == hashlib.sha512(data).hexdigest()
    glance.set_properties(record["id"], is_torrentable="true", torrent_magnet="magnet:?x")
    assert glance.get_image(record["id"])["is_torrentable"] == "true"
    glance.remove_properties(record["id"], ["torrent_magnet"])
    assert "torrent_magnet" not in glance.get_image(record["id"])

    dest = tmp_path / "out"
    glance.download(glance.image_info(record["id"]), str(dest))
    assert dest.read_bytes() == data
    assert origin.bytes_served == len(data)


def test_glanceclient_upload_and_range(origin):
    glance = GlanceClient.for_endpoint(origin.url)
    image = glance.client.images.create(name="x", disk_format="raw", container_format="bare")
    payload = os.urandom(100_000)
    glance.client.images.upload(image["id"], io.BytesIO(payload), image_size=len(payload))
    record = glance.get_image(image["id"])
    assert record["status"] == "active" and record["size"] == len(payload)
    r = requests.get(
        f"{origin.url}/v2/images/{image['id']}/file", headers={"Range": "bytes=10-19"}, timeout=10
    )
    assert r.status_code == 206 and r.content == payload[10:20]


def test_upload_rate_cap(tmp_path):
    src = tmp_path / "img"
    src.write_bytes(os.urandom(2 * 1024 * 1024))
    with HTTPOrigin(str(tmp_path / "o"), upload_rate=4 * 1024 * 1024) as origin:
        record = origin.create_image(str(src))
        glance = GlanceClient.for_endpoint(origin.url)
        started = time.monotonic()
        glance.download(glance.image_info(record["id"]), str(tmp_path / "out"))
        took = time.monotonic() - started
    assert took >= 0.4  # 2 MiB at 4 MiB/s
