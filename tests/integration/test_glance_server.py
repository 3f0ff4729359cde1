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

"""The real glance-api used by integration tests behaves as the library expects."""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from glanceclient import exc as glance_exc

from nova_torrent_images.testing.glance_server import GlanceServer

pytest_plugins = ["tests.integration.glance_fixtures"]

pytestmark = pytest.mark.integration

MAGNET = "magnet:?xt=urn:btih:" + "0123456789abcdef0123" * 2


def _file_url(server: GlanceServer, image_id: str) -> str:
    return f"{server.url}/v2/images/{image_id}/file"


def test_image_lifecycle(glance_server: GlanceServer, glance_client) -> None:
    data = os.urandom(3 * 1024 * 1024 + 123)
    image = glance_server.create_image(
        data, name="lifecycle", is_torrentable="true", torrent_magnet=MAGNET
    )
    image_id = image["id"]

    assert image["status"] == "active"
    assert image["size"] == len(data)
    assert image["os_hash_algo"] == "sha512"
    assert image["os_hash_value"] == hashlib.sha512(data).hexdigest()
    assert image["is_torrentable"] == "true"
    assert image["torrent_magnet"] == MAGNET
    assert image["disk_format"] == "raw"
    assert image["visibility"] == "public"
    assert glance_server.image_path(image_id).read_bytes() == data

    # Download through glanceclient (it verifies os_hash_value itself).
    assert b"".join(glance_client.images.data(image_id)) == data

    # Range reads from the file store: 206 with exactly the requested bytes.
    resp = requests.get(
        _file_url(glance_server, image_id),
        headers={**glance_server.identity_headers(), "Range": "bytes=1000-65535"},
        timeout=30,
    )
    assert resp.status_code == 206
    assert resp.headers["Content-Range"] == f"bytes 1000-65535/{len(data)}"
    assert resp.content == data[1000:65536]

    updated = glance_client.images.update(image_id, foo="bar")
    assert updated["foo"] == "bar"
    assert glance_client.images.get(image_id)["foo"] == "bar"
    assert glance_client.images.get(image_id)["is_torrentable"] == "true"

    glance_client.images.delete(image_id)
    with pytest.raises(glance_exc.HTTPNotFound):
        glance_client.images.get(image_id)
    assert not glance_server.image_path(image_id).exists()


def test_concurrent_range_downloads(glance_server: GlanceServer, glance_client) -> None:
    """One worker process serves several requests at once, even while one is stuck.

    A stalled upload occupies a worker thread until it finishes; with one thread (or a
    sync worker) every other request would wait behind it (checked: ReadTimeout).
    """
    mib = 1024 * 1024
    data = os.urandom(8 * mib)
    image = glance_server.create_image(data, name="concurrent")
    stalled = glance_client.images.create(
        name="stalled", disk_format="raw", container_format="bare"
    )
    url = _file_url(glance_server, image["id"])
    headers = glance_server.identity_headers()
    release = threading.Event()
    upload_errors: list[BaseException] = []

    def stalled_body() -> Iterator[bytes]:
        yield b"a" * 65536
        release.wait(60)
        yield b"b" * 65536

    def upload() -> None:
        try:
            r = requests.put(
                _file_url(glance_server, stalled["id"]),
                data=stalled_body(),
                headers={**headers, "Content-Type": "application/octet-stream"},
                timeout=60,
            )
            r.raise_for_status()
        except Exception as e:  # noqa: BLE001 - reported below
            upload_errors.append(e)

    uploader = threading.Thread(target=upload)
    uploader.start()
    try:
        results: dict[int, bytes] = {}
        errors: list[BaseException] = []

        def fetch(i: int) -> None:
            first = i * mib
            try:
                rng = f"bytes={first}-{first + mib - 1}"
                r = requests.get(url, headers={**headers, "Range": rng}, timeout=10)
                assert r.status_code == 206
                results[i] = r.content
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=fetch, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors, errors
        for i in range(8):
            assert results[i] == data[i * mib : (i + 1) * mib]
    finally:
        release.set()
        uploader.join(timeout=60)
        glance_client.images.delete(image["id"])
    assert not upload_errors, upload_errors
    assert glance_client.images.get(stalled["id"])["size"] == 2 * 65536
    glance_client.images.delete(stalled["id"])


def test_create_image_streams_from_path(
    glance_server: GlanceServer, glance_client, tmp_path: Path
) -> None:
    """A 64 MiB image uploads from its file without being read into memory."""
    size = 64 * 1024 * 1024
    path = tmp_path / "big.img"
    digest = hashlib.sha512()
    with open(path, "wb") as f:
        for _ in range(size // (4 * 1024 * 1024)):
            chunk = os.urandom(4 * 1024 * 1024)
            digest.update(chunk)
            f.write(chunk)

    # Warm up first: importing glanceclient and fetching schemas allocate ~20 MiB once.
    warm_up = glance_server.create_image(b"warm-up", name="warm-up")
    glance_client.images.delete(warm_up["id"])

    tracemalloc.start()
    try:
        image = glance_server.create_image(path, name="big", is_torrentable="false")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    try:
        assert image["size"] == size
        assert image["os_hash_value"] == digest.hexdigest()
        # Measured: about 2.3 MiB for any size (1 MiB chunks); a copy would be 64 MiB.
        assert peak < 16 * 1024 * 1024, f"upload used {peak} bytes of Python memory"
    finally:
        glance_client.images.delete(image["id"])


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def test_start_on_other_address_and_stop_cleanly(glance_installed: None) -> None:
    with GlanceServer(host="127.0.0.2") as server:
        assert server.url == f"http://127.0.0.2:{server.port}"
        # Connection: close, or gunicorn lets the kept-alive connection linger ~2s on stop.
        resp = requests.get(f"{server.url}/versions", headers={"Connection": "close"}, timeout=10)
        assert resp.status_code == 200
        pid, port, workdir = server.pid, server.port, server.workdir
        assert pid is not None and port is not None
        assert not _port_is_free("127.0.0.2", port)
        assert server.startup_seconds is not None and server.startup_seconds < 30

    assert not server.running
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # master and worker (the whole process group) are gone
    assert _port_is_free("127.0.0.2", port)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.2:{port}/versions", timeout=5)
    assert not workdir.exists()  # a temporary work directory is removed
