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

"""Fixtures for integration tests: real libtorrent hosts on 127.0.0.x and images in Glance."""

from __future__ import annotations

import hashlib
import os

import pytest
from glanceclient import exc as glance_exc

from nova_torrent_images.glance.client import GlanceClient
from nova_torrent_images.swarm.torrent import make_torrent
from nova_torrent_images.testing.swarm import SimulatedHost

MiB = 1024 * 1024


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


def require_program(found: str | None, program: str, package: str, tests: str) -> None:
    """Skip where a Debian program is missing, fail in CI (which installs it)."""
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{program} is not installed; CI must run the {tests} tests")
        pytest.skip(f"{program} (Debian package {package}) is not installed")


@pytest.fixture
def tracker(tmp_path):
    """Debian's opentracker in whitelist mode on 127.0.0.1 (CI installs it)."""
    from nova_torrent_images.testing.opentracker import Opentracker, find_binary

    require_program(find_binary(), "opentracker", "opentracker", "tracker")
    with Opentracker(workdir=tmp_path / "tracker") as ot:
        yield ot


@pytest.fixture
def hosts():
    """Factory of simulated hosts, each on its own 127.0.0.x; all stopped afterwards."""
    made: list[SimulatedHost] = []

    def make(name: str, **conf_overrides) -> SimulatedHost:
        host = SimulatedHost(name, **conf_overrides)
        made.append(host)
        return host

    yield make
    for host in made:
        host.stop()


class PublishedImage:
    """A raw image in Glance, its local copy and its torrent (not yet in Glance metadata)."""

    def __init__(self, glance_server, path: str, record: dict, torrent) -> None:
        self.glance_server = glance_server
        self.path = path
        self.record = record
        self.torrent = torrent
        self.id = record["id"]

    def set_magnet(self, peers=(), trackers=(), torrentable="true") -> str:
        magnet = self.torrent.magnet(peers=peers, trackers=trackers, max_length=None)
        self.glance_server.client().images.update(
            self.id, is_torrentable=torrentable, torrent_magnet=magnet
        )
        return magnet


@pytest.fixture
def make_image(glance_server, tmp_path):
    """Create a random raw image of ``size`` bytes in Glance and a torrent of it."""
    created = []

    def make(
        size: int = 64 * MiB, name: str = "test-image", visibility: str = "public"
    ) -> PublishedImage:
        path = str(tmp_path / f"origin-{len(created)}.raw")
        with open(path, "wb") as f:
            left = size
            while left:
                n = min(left, 8 * MiB)
                f.write(os.urandom(n))
                left -= n
        record = glance_server.create_image(path, name=name, visibility=visibility)
        with open(path, "rb") as f:
            assert record["os_hash_value"] == hashlib.file_digest(f, "sha512").hexdigest()
        image = PublishedImage(glance_server, path, record, make_torrent(path, name=record["id"]))
        created.append(image)
        return image

    yield make
    client = glance_server.client()
    for image in created:
        try:
            client.images.delete(image.id)
        except glance_exc.HTTPNotFound:
            pass  # the test deleted it itself


@pytest.fixture
def glance(glance_server):
    return GlanceClient.for_endpoint(glance_server.url)
