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

"""``[xenserver] image_handler = torrent`` through Nova 21.2.4's own loader and call sites.

Nova of Ussuri runs in a child process (nova_xenapi_child.py) from its sdist, fetched by
pip and pinned (nova_ussuri.py); the fake XAPI, glance-api and the swarm run here.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import uuid

import pytest
import XenAPI

from nova_torrent_images.compute.stores.xenapi import TAG, XenAPIStore
from nova_torrent_images.testing.fake_xenapi import FakeXenAPI
from nova_torrent_images.testing.swarm import next_loopback_address
from tests.integration import nova_ussuri
from tests.integration.test_glance_outage import dead_endpoint

MiB = 1024 * 1024
GiB = 1024 * MiB
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHILD = os.path.join(os.path.dirname(__file__), "nova_xenapi_child.py")


@pytest.fixture(scope="module")
def ussuri_path():
    try:
        return nova_ussuri.pythonpath(REPO)
    except nova_ussuri.Unavailable as exc:
        pytest.skip(f"Nova {nova_ussuri.NOVA_VERSION} could not be set up: {exc}")


def free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def vdi_bytes_sha512(fake, vdi_uuid: str, size: int) -> str:
    ref = next(r for r in fake.all_refs("VDI") if fake.get_record("VDI", r)["uuid"] == vdi_uuid)
    with open(fake.vdi_path(ref), "rb") as f:
        return hashlib.sha512(f.read(size)).hexdigest()


def vdi_record(fake, vdi_uuid: str) -> dict:
    return next(
        fake.get_record("VDI", r)
        for r in fake.all_refs("VDI")
        if fake.get_record("VDI", r)["uuid"] == vdi_uuid
    )


def test_nova_ussuri_loads_and_calls_the_torrent_handler(
    ussuri_path, make_image, hosts, glance_server, tmp_path
):
    image = make_image(24 * MiB)
    seeder = hosts("seeder")
    seeder.seed(image.torrent.data, image.path)
    compute_address = next_loopback_address()
    compute_port = free_port(compute_address)
    image.set_magnet(peers=[seeder.endpoint])
    bad = make_image(4 * MiB, name="bad-magnet")
    glance_server.client().images.update(
        bad.id, is_torrentable="true", torrent_magnet="magnet:?xt=urn:btih:not-a-hash"
    )
    uncached = make_image(4 * MiB, name="never-booted")
    client = glance_server.client()
    snap_id = client.images.create(name="snap", disk_format="raw", container_format="bare")["id"]

    with FakeXenAPI.create(tmp_path / "xapi", sr_size=2 * GiB) as fake:
        url = fake.start_server()
        nova_conf = tmp_path / "nova.conf"
        nova_conf.write_text(
            f"""[DEFAULT]
# VMOps builds a compute API, which wants an RPC transport; nothing is sent over it.
transport_url = fake:/

[xenserver]
image_handler = torrent
connection_url = {url}
connection_username = root
connection_password = secret

[torrent_images]
state_dir = {tmp_path / "state"}
glance_endpoint = {glance_server.url}
glance_noauth = true
glance_retries = 0
listen_interfaces = {compute_address}:{compute_port}
xenapi_compute_vm_uuid = {fake.compute_vm_uuid}
xenapi_device_dir = {fake.dev_dir()}
stall_timeout = 20
"""
        )
        args = {
            "nova_conf": str(nova_conf),
            "image_id": image.id,
            "bad_magnet_id": bad.id,
            "missing_id": str(uuid.uuid4()),
            "uncached_id": uncached.id,
            "dead_glance": dead_endpoint(),
            "snapshot_id": snap_id,
        }
        env = {**os.environ, "PYTHONPATH": ussuri_path}
        child = subprocess.Popen(
            [sys.executable, CHILD, json.dumps(args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(tmp_path / "child.log", "w"),  # noqa: SIM115
            text=True,
            env=env,
        )
        try:
            phases = {}

            def phase(name: str) -> dict:
                while True:
                    line = child.stdout.readline()
                    if not line:
                        child.wait(timeout=30)
                        log = (tmp_path / "child.log").read_text()[-4000:]
                        pytest.fail(f"child ended before phase {name}:\n{log}")
                    if line.startswith("{"):
                        report = json.loads(line)
                        phases[report["phase"]] = report
                        if report["phase"] == name:
                            return report

            booted = phase("booted")
            # Nova's loader built our handler for [xenserver] image_handler = torrent.
            assert booted["choice"] == "torrent"
            assert (
                booted["handler"]
                == "nova_torrent_images.virt.xenapi.nova_loader.NovaTorrentHandler"
            )
            assert booted["source"] == "torrent"
            size = image.record["size"]
            # The instance's disk (Nova's clone of its cache VDI) holds the image.
            assert vdi_bytes_sha512(fake, booted["root"], size) == image.record["os_hash_value"]
            cache_rec = vdi_record(fake, booted["nova_cache"])
            assert cache_rec["other_config"]["image-id"] == image.id
            # Our read-only base copy, seeded.
            base = vdi_record(fake, booted["base"])
            # A VDI.snapshot, attached only read-only (the seed's view of it).
            assert base["is_a_snapshot"] and base["other_config"][TAG + "role"] == "base"
            assert base["VBDs"] and all(
                fake.get_record("VBD", vbd)["mode"] == "RO" for vbd in base["VBDs"]
            )
            assert vdi_bytes_sha512(fake, booted["base"], size) == image.record["os_hash_value"]
            assert booted["seeding"] == [image.id]

            # The seeder goes; a new host gets the image from the Nova host alone.
            seeder.stop()
            peer = hosts("peer", stall_timeout=20)
            image.set_magnet(peers=[(compute_address, compute_port)])
            from nova_torrent_images.compute.pipeline import fetch_to_file
            from nova_torrent_images.glance.client import GlanceClient

            info = GlanceClient.for_endpoint(glance_server.url, peer.conf).image_info(image.id)
            result = fetch_to_file(
                info, str(tmp_path / "peer.raw"), conf=peer.conf, glance=None, engine=peer.engine
            )
            assert result.source == "torrent"
            with open(tmp_path / "peer.raw", "rb") as f:
                assert hashlib.file_digest(f, "sha512").hexdigest() == image.record["os_hash_value"]
            child.stdin.write("go\n")
            child.stdin.flush()

            # Nova's own cache answers the second boot: our handler is not called again.
            second = phase("second")
            assert second["handler_calls"] == 1 and second["root"] != booted["root"]
            assert vdi_bytes_sha512(fake, second["root"], size) == image.record["os_hash_value"]

            # Bad torrent metadata: a verified Glance download instead.
            fell_back = phase("bad_magnet")
            assert fell_back["source"] == "glance"
            assert (
                vdi_bytes_sha512(fake, fell_back["root"], bad.record["size"])
                == bad.record["os_hash_value"]
            )

            # What Nova's own handlers raise, and nothing left behind.
            failures = phase("failures")
            assert failures["errors"]["missing"] == "ImageNotFound"
            assert failures["errors"]["glance_down"].startswith("CouldNotFetchImage")
            assert failures["vdis_after"] == failures["vdis_before"]

            assert phase("uploaded")["kept"] is True
            assert child.wait(timeout=60) == 0
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        record = dict(client.images.get(snap_id))
        assert record["status"] == "active"

        # The host's next process: what the dead one left is cleaned up, never Nova's
        # image cache VDI (a clone this library made and Nova adopted).
        session = XenAPI.Session(url)
        session.login_with_password("root", "secret", "1.0", "nti-restart")
        try:
            store = XenAPIStore(
                session, compute_vm_uuid=fake.compute_vm_uuid, device_dir=str(fake.dev_dir())
            )
            store.remove_stale_slots()
            assert vdi_record(fake, booted["nova_cache"])["other_config"]["image-id"] == image.id
            assert store.lookup(image.id) is not None
        finally:
            session.xenapi.session.logout()
        report = fake.leaks()
        assert not report.vbds and not report.sessions, str(report)
    client.images.delete(snap_id)
