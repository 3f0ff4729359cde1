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

"""The status file: written by the seeding process, read only while that process lives."""

import json
import os
import subprocess

import pytest

from nova_torrent_images.compute.seeding import status
from nova_torrent_images.compute.seeding.seeds import SeedStatus


def statuses():
    return [
        SeedStatus("img-1", 1024, True, False, 100.0, 50.0, bytes_up=4096, peers=2),
        SeedStatus("img-2", 2048, False, True, 90.0, 40.0, info_hash="ab" * 32),
    ]


def test_write_then_read_live_round_trip(tmp_path):
    status.write(str(tmp_path), "directory /x", statuses())
    live = status.read_live(str(tmp_path))
    assert set(live) == {"img-1", "img-2"}
    assert live["img-1"]["bytes_up"] == 4096 and live["img-1"]["seeding"] is True
    assert live["img-1"]["peers"] == 2
    assert live["img-2"]["in_use"] is True and live["img-2"]["info_hash"] == "ab" * 32
    with open(tmp_path / status.FILE_NAME) as f:
        raw = json.load(f)
    assert raw["pid"] == os.getpid() and raw["store"] == "directory /x"
    assert os.listdir(tmp_path) == [status.FILE_NAME]  # no temporary file left


def test_write_replaces_the_previous_numbers(tmp_path):
    status.write(str(tmp_path), "s", statuses())
    status.write(str(tmp_path), "s", statuses()[1:])
    assert set(status.read_live(str(tmp_path))) == {"img-2"}


def test_read_live_is_empty_when_the_writer_died(tmp_path):
    status.write(str(tmp_path), "s", statuses())
    proc = subprocess.Popen(["true"])
    proc.wait()
    path = tmp_path / status.FILE_NAME
    data = json.loads(path.read_text())
    data["pid"] = proc.pid
    path.write_text(json.dumps(data))
    assert status.read_live(str(tmp_path)) == {}


def test_read_live_without_a_file(tmp_path):
    assert status.read_live(str(tmp_path)) == {}
    assert status.read_live(str(tmp_path / "missing")) == {}


@pytest.mark.parametrize(
    "content",
    [
        pytest.param("", id="empty"),
        pytest.param("{not json", id="not-json"),
        pytest.param("[]", id="a-list"),
        pytest.param("null", id="null"),
        pytest.param('{"images": []}', id="no-pid"),
        pytest.param('{"pid": "abc", "images": []}', id="pid-not-a-number"),
        pytest.param('{"pid": null, "images": []}', id="pid-null"),
        # A live writer's pid, with images that are not what write() puts there.
        pytest.param('{"pid": %(pid)d, "images": 5}', id="images-not-a-list"),
        pytest.param('{"pid": %(pid)d, "images": [1, 2]}', id="image-entries-not-objects"),
        pytest.param('{"pid": %(pid)d, "images": [{"seeding": true}]}', id="entry-without-id"),
    ],
)
def test_read_live_ignores_garbage(tmp_path, content):
    (tmp_path / status.FILE_NAME).write_text(content % {"pid": os.getpid()})
    assert status.read_live(str(tmp_path)) == {}
