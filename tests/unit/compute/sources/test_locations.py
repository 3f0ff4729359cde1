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

import http.server
import os
import threading
import time

import pytest

from nova_torrent_images import exception
from nova_torrent_images.compute.sources.locations import (
    Location,
    LocationSettings,
    ThroughputStats,
    discover,
    fetch_from_locations,
    rank,
)
from nova_torrent_images.compute.stores.base import Slot
from nova_torrent_images.testing.images import image_info

DATA = os.urandom(3 * 1024 * 1024 + 17)


def image(locations=(), direct_url=None, data=DATA):
    return image_info(data, disk_format=None, locations=list(locations), direct_url=direct_url)


def settings(tmp_path, **kw):
    values = {
        "preference": (),
        "zone": None,
        "zone_caches": (),
        "stall_timeout": 1.0,
        "state_dir": str(tmp_path),
        "file_prefixes": (str(tmp_path),),
        "min_rate": 0,
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


def test_zone_caches_are_deprecated_and_say_so_once(tmp_path, monkeypatch, caplog):
    from nova_torrent_images.compute.sources import locations
    from nova_torrent_images.conf import sources as source_opts

    opt = next(o for o in source_opts.source_opts if o.name == "zone_caches")
    assert opt.deprecated_for_removal and "stripe server" in opt.deprecated_reason
    monkeypatch.setattr(locations, "_zone_caches_warned", False)
    discover(image(), settings(tmp_path))  # none configured: nothing said
    assert "zone_caches" not in caplog.text
    for _ in range(3):
        discover(image(), settings(tmp_path, zone_caches=("http://cache:8080/",)))
    warned = [r for r in caplog.records if "zone_caches" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelname == "WARNING"
    assert "origin_stripe_advertise" in warned[0].getMessage()


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
    with pytest.raises(exception.NoLocations, match="img-1"):
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
    with pytest.raises(exception.LocationError) as failed:
        fetch_from_locations(img, slot, settings(tmp_path), verify_hash=True)
    assert "/nonexistent/a" in str(failed.value) and "127.0.0.1:9" in str(failed.value)


# -- locations that must not be read -----------------------------------------------


def good_copy(tmp_path):
    whole = tmp_path / "mount" / "whole"
    whole.parent.mkdir(exist_ok=True)
    whole.write_bytes(DATA)
    return f"file://{whole}"


def fetch_first_then_good(tmp_path, url, **kw):
    """Fetch with ``url`` ranked first and a good file:// copy second."""
    img = image([{"url": url}, {"url": good_copy(tmp_path)}])
    slot = Slot("img-1", len(DATA), str(tmp_path / "slot"))
    kw.setdefault("preference", (url,))
    result = fetch_from_locations(img, slot, settings(tmp_path, **kw), verify_hash=True)
    assert result.location == good_copy(tmp_path)
    assert (tmp_path / "slot").read_bytes() == DATA
    return result


def refusal(caplog) -> str:
    return " ".join(r.getMessage() for r in caplog.records if "trying the next" in r.getMessage())


def test_a_file_location_outside_the_mount_prefixes_is_refused(tmp_path, caplog):
    outside = tmp_path / "elsewhere"
    outside.write_bytes(DATA)
    fetch_first_then_good(tmp_path, f"file://{outside}", file_prefixes=(str(tmp_path / "mount"),))
    assert "outside [torrent_images] location_file_prefixes" in refusal(caplog)
    caplog.clear()
    # Dot segments do not climb out of a mount either.
    mount = tmp_path / "mount"
    dotted = f"file://{mount}/../elsewhere"
    fetch_first_then_good(tmp_path, dotted, file_prefixes=(str(mount),))
    assert "not a plain absolute path" in refusal(caplog)


def test_a_file_location_with_no_prefixes_configured_is_refused(tmp_path, caplog):
    whole = tmp_path / "whole"
    whole.write_bytes(DATA)
    slot = Slot("img-1", len(DATA), str(tmp_path / "slot"))
    with pytest.raises(exception.LocationError, match="location_file_prefixes=\\(none\\)"):
        fetch_from_locations(
            image([{"url": f"file://{whole}"}]),
            slot,
            settings(tmp_path, file_prefixes=()),
            verify_hash=True,
        )


@pytest.mark.parametrize("where", ["file", "directory"])
def test_a_file_location_through_a_symlink_is_refused(tmp_path, caplog, where):
    secret = tmp_path / "secret"
    secret.write_bytes(DATA)  # the right bytes even: the link alone is refused
    mount = tmp_path / "mount"
    mount.mkdir()
    if where == "file":
        (mount / "link").symlink_to(secret)
        url = f"file://{mount}/link"
    else:
        (mount / "dir").symlink_to(tmp_path)
        url = f"file://{mount}/dir/secret"
    fetch_first_then_good(tmp_path, url, file_prefixes=(str(mount),))
    assert "symbolic link" in refusal(caplog)


def test_a_file_location_to_a_device_or_fifo_is_refused(tmp_path, caplog):
    fetch_first_then_good(tmp_path, "file:///dev/zero", file_prefixes=("/dev", str(tmp_path)))
    assert "not a regular file" in refusal(caplog)
    caplog.clear()
    fifo = tmp_path / "mount" / "fifo"
    fifo.parent.mkdir(exist_ok=True)
    os.mkfifo(fifo)
    started = time.monotonic()
    fetch_first_then_good(tmp_path, f"file://{fifo}")  # opening it must not hang
    assert time.monotonic() - started < 5
    assert "not a regular file" in refusal(caplog)


def test_a_file_location_naming_a_directory_is_refused_and_the_next_used(tmp_path, caplog):
    directory = tmp_path / "mount" / "images"
    directory.mkdir(parents=True)
    # Before: IsADirectoryError escaped the reader and ended the fetch.
    fetch_first_then_good(tmp_path, f"file://{directory}")
    assert "not a regular file" in refusal(caplog)


def test_a_file_location_with_a_nul_byte_is_refused_and_the_next_used(tmp_path, caplog):
    # Before: os.open raised ValueError ("embedded null byte") and the fetch failed.
    fetch_first_then_good(tmp_path, f"file://{tmp_path}/mount/a%00b")
    assert "NUL byte" in refusal(caplog)


def test_a_reader_that_fails_untyped_does_not_end_the_fetch(tmp_path, caplog, monkeypatch):
    from nova_torrent_images.compute.sources import readers

    def broken(self, request):
        raise RuntimeError("a reader's own bug")

    monkeypatch.setattr(readers.HTTPLocationReader, "read_into", broken)
    fetch_first_then_good(tmp_path, "http://127.0.0.1:9/img")
    assert any("unexpected RuntimeError" in r.getMessage() or r.exc_info for r in caplog.records)


class Misbehaving(http.server.ThreadingHTTPServer):
    """Answers every GET the way ``mode`` says; counts requests."""

    daemon_threads = True

    def __init__(self, mode: str, redirect_to: str = "") -> None:
        self.mode, self.redirect_to, self.requests = mode, redirect_to, 0
        self.stop = threading.Event()
        super().__init__(("127.0.0.1", 0), _MisbehavingHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/img"

    def close(self) -> None:
        self.stop.set()
        self.shutdown()
        self.server_close()


class _MisbehavingHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        server = self.server
        server.requests += 1
        mode = server.mode
        if mode == "redirect":
            self.send_response(302)
            self.send_header("Location", server.redirect_to)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if mode == "slow-headers":  # a slowloris: one header byte at a time
            for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"x" * 1000:
                if server.stop.wait(0.05):
                    return
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
            return
        body = DATA
        if mode == "more":  # no length announced, and more bytes than the image
            body = DATA + b"and then some"
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
        elif mode == "announces-more":
            self.send_response(200)
            self.send_header("Content-Length", str(len(DATA) + 10))
            self.end_headers()
        elif mode == "less":  # announces the image, sends less, closes
            self.send_response(200)
            self.send_header("Content-Length", str(len(DATA)))
            self.end_headers()
            body = DATA[: len(DATA) // 3]
        else:
            self.send_response(200)
            self.send_header("Content-Length", str(len(DATA)))
            self.end_headers()
        if mode == "slow-body":  # a byte stream that never stalls long, at 40 KiB/s
            for at in range(0, len(body), 2048):
                if server.stop.wait(0.05):
                    return
                self.wfile.write(body[at : at + 2048])
                self.wfile.flush()
            return
        self.wfile.write(body)
        self.close_connection = True


@pytest.fixture
def misbehaving():
    made = []

    def make(mode, **kw):
        made.append(Misbehaving(mode, **kw))
        return made[-1]

    yield make
    for server in made:
        server.close()


def test_an_http_location_that_redirects_elsewhere_is_refused(tmp_path, caplog, misbehaving):
    elsewhere = misbehaving("fine")
    server = misbehaving("redirect", redirect_to=elsewhere.url)
    fetch_first_then_good(tmp_path, server.url)
    assert "redirects (HTTP 302)" in refusal(caplog) and elsewhere.url in refusal(caplog)
    assert elsewhere.requests == 0  # never followed


def test_an_http_location_whose_headers_trickle_is_abandoned(tmp_path, caplog, misbehaving):
    server = misbehaving("slow-headers")
    started = time.monotonic()
    fetch_first_then_good(tmp_path, server.url, stall_timeout=1.0)
    assert time.monotonic() - started < 10
    assert "no complete answer within" in refusal(caplog)


def test_an_http_location_that_sends_slowly_is_abandoned(tmp_path, caplog, misbehaving):
    server = misbehaving("slow-body")
    started = time.monotonic()
    result = fetch_first_then_good(tmp_path, server.url, stall_timeout=1.0, min_rate=1024 * 1024)
    assert time.monotonic() - started < 10
    assert "location_min_rate=1024" in refusal(caplog)
    assert result.bytes_from_location == len(DATA)


@pytest.mark.parametrize("mode", ["more", "announces-more", "less"])
def test_an_http_location_that_sends_another_size_is_refused(tmp_path, caplog, misbehaving, mode):
    server = misbehaving(mode)
    fetch_first_then_good(tmp_path, server.url)
    said = refusal(caplog)
    expected = {
        "more": "more than the",
        "announces-more": "it announced",
        "less": "at byte",
    }[mode]
    assert expected in said, said
