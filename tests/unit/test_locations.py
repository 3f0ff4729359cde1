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

"""Locations as sources: discovery, ranking, resuming across sources, verification."""

from __future__ import annotations

import hashlib
import http.server
import os
import threading

import pytest

from nova_torrent_images import exception
from nova_torrent_images.image import parse_image
from nova_torrent_images.locations import (
    Location,
    LocationError,
    LocationSettings,
    NoLocations,
    ThroughputStats,
    discover,
    fetch_from_locations,
    rank,
)
from nova_torrent_images.stores.base import Slot

DATA = os.urandom(3 * 1024 * 1024 + 17)


def image(locations=(), direct_url=None, data=DATA):
    record = {
        "id": "img-1",
        "status": "active",
        "size": len(data),
        "os_hash_algo": "sha512",
        "os_hash_value": hashlib.sha512(data).hexdigest(),
        "locations": list(locations),
    }
    if direct_url:
        record["direct_url"] = direct_url
    return parse_image(record)


def settings(tmp_path, **kw):
    values = {
        "preference": (),
        "zone": None,
        "zone_caches": (),
        "stall_timeout": 1.0,
        "state_dir": str(tmp_path),
    }
    values.update(kw)
    return LocationSettings(**values)


def test_discover_keeps_what_a_host_can_read(tmp_path):
    img = image(
        [
            {"url": "rbd://fsid/pool/img/snap", "metadata": {}},
            {"url": "file:///mnt/images/img-1", "metadata": {"zone": "a"}},
            {"url": "http://10.0.0.5/img-1", "metadata": {}},
            {"url": 42, "metadata": {}},
        ],
        direct_url="file:///mnt/images/img-1",
    )
    found = discover(img, settings(tmp_path, zone_caches=("http://cache:8080/",)))
    assert [(loc.url, loc.kind, loc.origin) for loc in found] == [
        ("file:///mnt/images/img-1", "file", "location"),
        ("http://10.0.0.5/img-1", "http", "location"),
        ("http://cache:8080/v2/images/img-1/file", "http", "zone-cache"),
    ]


def test_rank_by_preference_then_zone_then_throughput(tmp_path):
    a = Location("http://a/x", "http")
    b = Location("http://b/x", "http", zone="z1")
    c = Location("file:///c/x", "file")
    d = Location("http://d/x", "http")
    ThroughputStats(str(tmp_path)).record("http://d", 100 * 1024 * 1024, 1.0)
    ranked = rank([a, b, c, d], settings(tmp_path, preference=("file://",), zone="z1"))
    assert [loc.url for loc in ranked] == ["file:///c/x", "http://b/x", "http://d/x", "http://a/x"]


def test_no_location_is_a_typed_error(tmp_path):
    slot = Slot("img-1", len(DATA), str(tmp_path / "slot"))
    with pytest.raises(NoLocations, match="img-1"):
        fetch_from_locations(image(), slot, settings(tmp_path), verify_hash=True)


class _Truncating(http.server.BaseHTTPRequestHandler):
    """Announces the whole image, sends half, closes: a broken connection."""

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", str(len(DATA)))
        self.end_headers()
        self.wfile.write(DATA[: len(DATA) // 2])
        self.close_connection = True


def test_a_broken_location_hands_over_at_the_byte_it_reached(tmp_path, caplog):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Truncating)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    whole = tmp_path / "whole"
    whole.write_bytes(DATA)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/img"
        img = image([{"url": url}, {"url": f"file://{whole}"}])
        slot = Slot("img-1", len(DATA), str(tmp_path / "slot"))
        result = fetch_from_locations(
            img, slot, settings(tmp_path, preference=("http://",)), verify_hash=True
        )
    finally:
        server.shutdown()
    assert result.location == f"file://{whole}"
    assert (tmp_path / "slot").read_bytes() == DATA
    assert any(f"continued at byte {len(DATA) // 2}" in r.getMessage() for r in caplog.records)


def test_wrong_bytes_never_pass(tmp_path):
    liar = tmp_path / "liar"
    liar.write_bytes(bytes([DATA[0] ^ 1]) + DATA[1:])
    slot = Slot("img-1", len(DATA), str(tmp_path / "slot"))
    with pytest.raises(exception.IntegrityError, match="img-1"):
        fetch_from_locations(
            image([{"url": f"file://{liar}"}]), slot, settings(tmp_path), verify_hash=True
        )


def test_every_location_failing_names_them_all(tmp_path):
    img = image([{"url": "file:///nonexistent/a"}, {"url": "http://127.0.0.1:9/b"}])
    slot = Slot("img-1", len(DATA), str(tmp_path / "slot"))
    with pytest.raises(LocationError) as failed:
        fetch_from_locations(img, slot, settings(tmp_path), verify_hash=True)
    assert "/nonexistent/a" in str(failed.value) and "127.0.0.1:9" in str(failed.value)
