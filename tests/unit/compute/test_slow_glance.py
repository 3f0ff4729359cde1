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

"""A slow or hung Glance is noticed in seconds: a boot of a cached image does not wait on it.

The XenAPI handler, the real Glance client and a local server on 127.0.0.1 that accepts
and never answers, answers the headers and stalls, or answers slowly. A host with a
verified base copy boots it (the kept record standing in, as while Glance is down) in
under ``glance_connect_timeout + glance_read_timeout`` + 5 s; one without fails with a
typed error in the same time, and nothing is left in its SR.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import types

import pytest

from nova_torrent_images import exception
from nova_torrent_images.compute.stores import open_store
from nova_torrent_images.glance.client import GlanceClient
from nova_torrent_images.testing.fake_xenapi import FakeXenAPI, MiB
from nova_torrent_images.testing.swarm import make_conf
from nova_torrent_images.virt.xenapi.handler import GlanceImageHandler
from tests.unit.compute.test_offline import IMAGE_ID, OWNER, StubGlance, record

CONNECT, READ = 1.0, 2.0
BOUND = CONNECT + READ + 5


class SlowGlance:
    """Accepts connections on 127.0.0.1 and misbehaves as ``mode`` says."""

    def __init__(self, mode: str, answer: bytes = b"") -> None:
        self.mode, self.answer = mode, answer
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.stop = threading.Event()
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.recv(65536)
            if self.mode == "silent":  # accepts, never answers
                self.stop.wait(60)
            elif self.mode == "stall":  # the headers, a byte of the body, then nothing
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 4000\r\n\r\n{"
                )
                self.stop.wait(60)
            else:  # slow: a few seconds per request, then the right answer
                time.sleep(1.5)
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(self.answer)}\r\n\r\n".encode()
                    + self.answer
                )
        except OSError:
            pass  # the client gave up: as it should
        finally:
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self.listener.close()
        for conn in self.connections:
            conn.close()


@pytest.fixture
def xen(tmp_path):
    fake = FakeXenAPI.create(tmp_path / "xapi", sr_size=64 * MiB, use_loop_devices=False)
    session = fake.session()
    conf = make_conf(
        state_dir=str(tmp_path / "state"),
        glance_connect_timeout=CONNECT,
        glance_read_timeout=READ,
        glance_metadata_budget=CONNECT + READ,
        glance_retries=3,
    )
    conf.set_override("glance_retry_delay", 0.2, group="torrent_images")
    fake.configure(conf)
    yield fake, session, conf
    session.xenapi.session.logout()
    fake.close()


def handler_with(conf, glance: dict) -> GlanceImageHandler:
    return GlanceImageHandler(
        conf,
        glance_factory=lambda context: glance["client"],
        store_factory=lambda s: open_store(conf, "xenapi", session=s),
    )


def our_vdis(fake) -> list[str]:
    """Every VDI this library tagged (slots, base copies, clones)."""
    return [
        ref
        for ref in fake.all_refs("VDI")
        if any(k.startswith("nti_") for k in fake.get_record("VDI", ref)["other_config"])
    ]


@pytest.mark.parametrize("mode", ["silent", "stall", "slow"])
def test_a_host_with_the_base_copy_boots_it_in_seconds(xen, mode):
    fake, session, conf = xen
    glance = {"client": StubGlance(record(visibility="private"))}
    handler = handler_with(conf, glance)
    owner = types.SimpleNamespace(project_id=OWNER, auth_token=None)
    handler.download_image(owner, session, {"name": "vm-1"}, IMAGE_ID)  # Glance was fine
    answer = json.dumps(record(visibility="private").record).encode()
    server = SlowGlance(mode, answer)
    try:
        glance["client"] = GlanceClient.for_endpoint(server.url, conf, timeout=600)
        started = time.monotonic()
        booted = handler.download_image(owner, session, {"name": "vm-2"}, IMAGE_ID)
        took = time.monotonic() - started
    finally:
        server.close()
        handler.shutdown()
    assert booted["root"]["uuid"]
    print(f"\n{mode}: booted the base copy in {took:.1f}s (bound {BOUND:.0f}s)")
    assert took < BOUND


@pytest.mark.parametrize("mode", ["silent", "stall"])
def test_a_host_without_the_base_copy_fails_typed_in_seconds(xen, mode):
    fake, session, conf = xen
    server = SlowGlance(mode)
    handler = handler_with(conf, {"client": GlanceClient.for_endpoint(server.url, conf)})
    before = set(our_vdis(fake))
    owner = types.SimpleNamespace(project_id=OWNER, auth_token=None)
    started = time.monotonic()
    try:
        with pytest.raises(exception.OfflineBootRefused, match="glance_read_timeout|timed out"):
            handler.download_image(owner, session, {"name": "vm-1"}, IMAGE_ID)
    finally:
        server.close()
        handler.shutdown()
    took = time.monotonic() - started
    print(f"\n{mode}: refused in {took:.1f}s (bound {BOUND:.0f}s)")
    assert took < BOUND
    assert set(our_vdis(fake)) == before  # nothing created, nothing left behind
