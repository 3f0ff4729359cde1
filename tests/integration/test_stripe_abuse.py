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

"""A fleet beside abusive clients of the origin's stripe endpoint, with the defaults.

Two images of one size on one capped origin: a 4-host fleet fetches the first alone,
then another 4-host fleet fetches the second while, from addresses of their own, a
client floods the dispenser with batch requests and fetches nothing, one asks for
ranges and never reads them, and one holds more connections than an address may, each
sending its headers a byte at a time. The second fleet must finish within 1.5x the first,
the origin still sending about one copy.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest

from nova_torrent_images.glance.client import GlanceClient
from nova_torrent_images.testing.http_origin import HTTPOrigin
from nova_torrent_images.testing.origin_node import start_origin_node
from nova_torrent_images.testing.swarm import SimulatedHost, next_loopback_address

from .test_stripes import fetch_on, sha512_of

MiB = 1024 * 1024
CAP = 16 * MiB
SIZE = 128 * MiB  # the floor is 8 s: long enough for a flood's hold to run out within it


@pytest.fixture
def two_images(tmp_path):
    with HTTPOrigin(str(tmp_path / "glance"), upload_rate=CAP) as glance_origin:
        ids = []
        for name in ("alone", "abused"):
            path = tmp_path / f"{name}.raw"
            path.write_bytes(os.urandom(SIZE))
            ids.append(glance_origin.create_image(str(path), name=name)["id"])
        node = start_origin_node(
            glance_origin.url, str(tmp_path / "origin"), upload_kib=CAP // 1024
        )
        try:
            for image_id in ids:
                node.publish(image_id)
            glance = GlanceClient.for_endpoint(glance_origin.url)
            yield glance, [glance.image_info(i) for i in ids], node, glance_origin
        finally:
            node.stop()


def timed_fleet(image, glance, node, glance_origin, tmp_path, name):
    hosts = [
        SimulatedHost(f"{name}-{i}", download_rate_limit=CAP // 1024, stall_timeout=60)
        for i in range(4)
    ]
    out = tmp_path / name
    out.mkdir()
    try:
        before = node.seeder.uploaded_bytes() + glance_origin.bytes_served
        started = time.monotonic()
        results = fetch_on(hosts, image, glance, out)
        took = time.monotonic() - started
        egress = node.seeder.uploaded_bytes() + glance_origin.bytes_served - before
    finally:
        for host in hosts:
            host.stop()
    for i, result in enumerate(results):
        assert result.source == "torrent"
        assert sha512_of(str(out / f"host-{i}.raw")) == image.hash_value
    return took, egress


class Abusers:
    """The three abusive clients, each on its own loopback address, until stopped."""

    def __init__(self, url: str, info_hash: str) -> None:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        self.server = (host, int(port))
        self.path = f"/v1/torrents/{info_hash}"
        self.stop = threading.Event()
        self.batches_taken = 0
        self.refused = 0
        self.threads = [
            threading.Thread(target=target, args=(next_loopback_address(),), daemon=True)
            for target in (self.flood, self.never_read, self.never_read, self.slowloris)
        ]

    def __enter__(self) -> Abusers:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)

    def connect(self, source: str, rcvbuf: int | None = None) -> socket.socket:
        sock = socket.socket()
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.bind((source, 0))
        sock.settimeout(5)
        sock.connect(self.server)
        return sock

    def ask(self, sock: socket.socket) -> list[int]:
        body = json.dumps({"part": 0, "parts": 1, "batches": 16}).encode()
        sock.sendall(
            f"POST {self.path}/stripes HTTP/1.1\r\nHost: origin\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            answer += chunk
        if not answer.startswith(b"HTTP/1.1 200"):
            self.refused += 1
            return []
        return json.loads(answer.split(b"\r\n\r\n", 1)[1])["pieces"]

    def flood(self, source: str) -> None:
        """Batch requests as fast as the origin answers; no data asked for."""
        sock = self.connect(source)
        while not self.stop.is_set():
            try:
                if self.ask(sock):
                    self.batches_taken += 1
            except OSError:
                sock.close()
                sock = self.connect(source)
        sock.close()

    def never_read(self, source: str) -> None:
        """A batch, then its range asked for over a tiny window that is never read."""
        while not self.stop.is_set():
            try:
                sock = self.connect(source, rcvbuf=4096)
            except OSError:
                self.stop.wait(0.5)
                continue
            try:
                pieces = self.ask(sock)
                if pieces:
                    start, end = pieces[0] * 256 * 1024, (pieces[-1] + 1) * 256 * 1024 - 1
                    sock.sendall(
                        f"GET {self.path}/data HTTP/1.1\r\nHost: origin\r\n"
                        f"Range: bytes={start}-{end}\r\n\r\n".encode()
                    )
                # Never read: wait until the origin shuts the connection down.
                while not self.stop.wait(0.5):
                    try:
                        if sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                            break
                    except BlockingIOError:
                        continue
            except OSError:
                pass  # shut down by the origin: once more
            finally:
                sock.close()

    def slowloris(self, source: str) -> None:
        """More connections than an address may hold, each trickling its headers."""
        socks = []
        while not self.stop.is_set():
            while len(socks) < 20:
                try:
                    socks.append(self.connect(source))
                except OSError:
                    break
            for sock in list(socks):
                try:
                    sock.send(b"G")
                except OSError:
                    socks.remove(sock)
                    sock.close()
            self.stop.wait(0.5)
        for sock in socks:
            sock.close()


def test_a_fleet_beside_abusive_clients_finishes_within_1_5x(two_images, tmp_path):
    glance, (alone, abused), node, glance_origin = two_images
    base, base_egress = timed_fleet(alone, glance, node, glance_origin, tmp_path, "alone")
    guard = node.seeder.stripes.guard
    with Abusers(node.seeder.stripes.url, abused.magnet.best_hash) as abusers:
        time.sleep(0.5)  # the abuse is under way before the fleet asks
        took, egress = timed_fleet(abused, glance, node, glance_origin, tmp_path, "abused")
        # The trickled headers are shut down origin_stripe_request_timeout (10 s) after
        # their first byte, which may come after a fleet this quick.
        deadline = time.monotonic() + 12
        while not guard.reaped["sending its request"] and time.monotonic() < deadline:
            time.sleep(0.2)
    print(
        f"fleet alone {base:.1f} s, {base_egress / SIZE:.2f} copies; beside abuse "
        f"{took:.1f} s ({took / base:.2f}x), {egress / SIZE:.2f} copies; guard reaped "
        f"{dict(guard.reaped)}, turned away {guard.turned_away}; flood batches "
        f"{abusers.batches_taken}"
    )
    assert took <= 1.5 * base, f"{took:.1f} s beside abuse, {base:.1f} s alone"
    assert egress <= 1.25 * SIZE, f"origin sent {egress / SIZE:.2f} copies"
    # Connections over the limit turned away, the trickled headers shut down (the unread
    # ranges are, origin_stripe_send_timeout after their last write: unit tests).
    assert guard.turned_away >= 1
    assert guard.reaped["sending its request"] >= 1
    # The flooder held at most an eighth of the image before it was struck.
    assert abusers.batches_taken * MiB <= SIZE // 8 + MiB
