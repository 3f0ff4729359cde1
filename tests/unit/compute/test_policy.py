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

import pytest

from nova_torrent_images.compute import policy
from nova_torrent_images.testing.images import image_info
from nova_torrent_images.testing.swarm import make_conf

MAGNET = "magnet:?xt=urn:btih:" + "a" * 40


def image(**props):
    fields = {"size": 64 << 20, "os_hash_value": "0" * 128, "torrent_magnet": MAGNET}
    return image_info(image_id="img", **{**fields, **props})


@pytest.mark.parametrize(
    "mode,props,expected",
    [
        ("none", {"is_torrentable": "true"}, False),
        ("some", {"is_torrentable": "true"}, True),
        ("some", {}, False),
        ("some", {"is_torrentable": "false"}, False),
        ("all", {}, True),
        ("all", {"is_torrentable": "false"}, False),
        ("all", {"torrent_magnet": None}, False),
        ("all", {"is_torrentable": "maybe"}, False),
        ("some", {"is_torrentable": "true", "torrent_magnet": "magnet:?xt=urn:btih:12"}, False),
        ("some", {"is_torrentable": "true", "status": "queued"}, False),
    ],
)
def test_mode_and_properties(mode, props, expected):
    decision = policy.decide(image(**props), make_conf(mode=mode))
    assert bool(decision) is expected, decision.reason
    assert decision.reason


def test_disk_format_restriction():
    conf = make_conf(mode="all")
    assert policy.decide(image(disk_format="raw"), conf, disk_formats=("raw",))
    decision = policy.decide(image(disk_format="qcow2"), conf, disk_formats=("raw",))
    assert not decision and "qcow2" in decision.reason


def test_size_floor():
    conf = make_conf(mode="all", min_torrent_image_size=100)
    decision = policy.decide(image(), conf)
    assert not decision and "min_torrent_image_size" in decision.reason
    assert policy.decide(image(size=200 << 20), conf)
