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

"""An image's own locations as sources: ranked by the host's settings, a stall falls through.

A real glance-api showing locations (``show_multiple_locations``) with the file store
(the image's ``file://`` location, which this host can read) and the http store (an
``http://`` location we add, served by a small server that can stall mid-body).
"""

from __future__ import annotations

import hashlib
import http.server
import os
import re
import threading
import time

import pytest

from nova_torrent_images.compute.pipeline import fetch_to_file
from nova_torrent_images.glance.client import GlanceClient
from nova_torrent_images.testing.glance_server import GlanceServer
from nova_torrent_images.testing.swarm import make_conf
from tests.integration.glance_fixtures import glance_installed  # noqa: F401

MiB = 1024 * 1024


class ImageHTTP(http.server.ThreadingHTTPServer):
    """Serves one image's bytes with Range; ``stall_after`` bytes, then hangs."""

    daemon_threads = True

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.stall_after: int | None = None
        self.requests = 0
        self.release = threading.Event()
        super().__init__(("127.0.0.1", 0), _Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/image.raw"


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def _head(self, start: int, end: int, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(self.server.data)}")
        self.end_headers()

    def do_HEAD(self) -> None:  # noqa: N802  Glance's http store asks the size
        self._head(0, len(self.server.data), 200)

    def do_GET(self) -> None:  # noqa: N802
        self.server.requests += 1
        data = self.server.data
        match = re.match(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        start = int(match.group(1)) if match else 0
        end = int(match.group(2)) + 1 if match and match.group(2) else len(data)
        self._head(start, end, 206 if match else 200)
        stall = self.server.stall_after
        body = data[start:end]
        if stall is not None:
            self.wfile.write(body[:stall])
            self.wfile.flush()
            self.server.release.wait(30)  # a stall: the connection stays open, silent
            return
        self.wfile.write(body)


@pytest.fixture(scope="module")
def located(tmp_path_factory, glance_installed):  # noqa: F811
    workdir = tmp_path_factory.mktemp("glance-locations")
    server = GlanceServer(
        workdir=workdir,
        extra_config={
            "DEFAULT": {
                "enabled_backends": "fs:file, web:http",
                "show_multiple_locations": "True",
                "show_image_direct_url": "True",
            },
            # Glance refuses loopback http locations unless allowed (its SSRF filter).
            "import_filtering_opts": {"allowed_ports": "[]", "allowed_hosts": "[127.0.0.1]"},
        },
    ).start()
    data = os.urandom(8 * MiB)
    web = ImageHTTP(data)
    try:
        record = server.create_image(data, name="located")
        server.client().images.add_location(
            record["id"], web.url, {"zone": "zone-b", "store": "web"}
        )
        yield server, web, record, data
    finally:
        web.release.set()
        web.shutdown()
        server.stop()


def host_conf(tmp_path, server=None, **overrides):
    """A host that mounts ``server``'s file store (its file:// locations), if given."""
    if server is not None:
        overrides.setdefault("location_file_prefixes", [str(server.data_dir)])
    return make_conf(
        state_dir=str(tmp_path / "state"),
        mode="none",
        source_order=["locations", "glance"],
        location_stall_timeout=1,
        **overrides,
    )


def data_reads(server, image_id: str) -> int:
    time.sleep(0.3)  # gunicorn logs a request after its response
    with open(server.access_log_path) as f:
        return sum(f"GET /v2/images/{image_id}/file " in line for line in f)


def test_glance_shows_both_locations(located):
    server, web, record, _ = located
    image = GlanceClient.for_endpoint(server.url).image_info(record["id"])
    urls = [loc["url"] for loc in image.record["locations"]]
    assert any(u.startswith("file://") for u in urls) and web.url in urls


@pytest.mark.parametrize("first", ["http://", "file://"])
def test_the_location_ranked_first_serves(located, tmp_path, first):
    server, web, record, data = located
    web.stall_after = None
    glance = GlanceClient.for_endpoint(server.url)
    image = glance.image_info(record["id"])
    reads = data_reads(server, image.id)
    dest = tmp_path / "image.raw"
    result = fetch_to_file(
        image,
        str(dest),
        conf=host_conf(tmp_path, server, location_preference=[first]),
        glance=glance,
    )
    assert result.source == "location" and result.location.startswith(first)
    assert hashlib.sha512(dest.read_bytes()).hexdigest() == image.hash_value
    assert data_reads(server, image.id) == reads  # nothing through the Glance API


def test_a_stalled_location_falls_through_and_the_next_continues(located, tmp_path, caplog):
    server, web, record, data = located
    web.stall_after = 3 * MiB
    glance = GlanceClient.for_endpoint(server.url)
    image = glance.image_info(record["id"])
    dest = tmp_path / "image.raw"
    started = time.monotonic()
    result = fetch_to_file(
        image,
        str(dest),
        conf=host_conf(tmp_path, server, location_preference=["http://", "file://"]),
        glance=glance,
    )
    assert time.monotonic() - started < 15
    assert result.location.startswith("file://")
    assert hashlib.sha512(dest.read_bytes()).hexdigest() == image.hash_value
    assert any("continued at byte" in r.getMessage() for r in caplog.records)
    web.release.set()


def test_zone_affinity_ranks_a_location_of_this_zone_first(located, tmp_path):
    server, web, record, _ = located
    web.stall_after = None
    web.release.clear()
    glance = GlanceClient.for_endpoint(server.url)
    image = glance.image_info(record["id"])
    result = fetch_to_file(
        image,
        str(tmp_path / "image.raw"),
        conf=host_conf(tmp_path, server, zone="zone-b"),
        glance=glance,
    )
    assert result.location == web.url  # its metadata names zone-b
