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

"""Snapshots with a real glance-api: kept on the saving host, queued while Glance is down."""

from __future__ import annotations

import hashlib
import types

import pytest

from nova_torrent_images import exception
from nova_torrent_images.glance.client import GlanceClient
from nova_torrent_images.testing.fake_xenapi import FakeXenAPI, GiB
from nova_torrent_images.virt.xenapi.handler import GlanceImageHandler
from tests.integration.test_glance_outage import dead_endpoint
from tests.integration.test_xenapi import (  # noqa: F401
    CountingGlance,
    make_handler,
    our_vdis,
    vdi_sha512,
    xenserver,
)

MiB = 1024 * 1024


def project(name: str = "p-1") -> types.SimpleNamespace:
    return types.SimpleNamespace(project_id=name, auth_token=None)


def vdi_bytes(fake, uuid: str) -> bytes:
    ref = [r for r in fake.all_refs("VDI") if fake.get_record("VDI", r)["uuid"] == uuid][0]
    with open(fake.vdi_path(ref), "rb") as f:
        return f.read()


def boot_and_write(fake, session, handler, image_id: str) -> tuple[str, bytes]:
    root = handler.download_image(project(), session, {"name": "vm-1"}, image_id)["root"]["uuid"]
    ref = [r for r in fake.all_refs("VDI") if fake.get_record("VDI", r)["uuid"] == root][0]
    with open(fake.vdi_path(ref), "r+b") as f:
        f.seek(MiB)
        f.write(b"the instance changed this" * 100)
    return root, vdi_bytes(fake, root)


def new_snapshot(glance_server) -> str:
    client = glance_server.client()
    return client.images.create(name="snap", disk_format="raw", container_format="bare")["id"]


def test_xenapi_restore_on_the_saving_host_reads_nothing_from_glance(
    xenserver,  # noqa: F811
    make_image,
    hosts,
    glance,
    glance_server,
    tmp_path,
):
    fake, session = xenserver
    image = make_image(8 * MiB)
    compute = hosts("compute-1")
    counting = CountingGlance(glance)
    handler = make_handler(GlanceImageHandler, compute, counting, fake, tmp_path)
    root, saved = boot_and_write(fake, session, handler, image.id)
    snap_id = new_snapshot(glance_server)
    try:
        handler.upload_image(project(), session, {"name": "vm-1"}, snap_id, [root])
        record = dict(glance_server.client().images.get(snap_id))
        assert record["status"] == "active"
        assert record["os_hash_value"] == hashlib.sha512(saved).hexdigest()
        reads = counting.data_reads

        restored = handler.download_image(project(), session, {"name": "vm-2"}, snap_id)

        assert counting.data_reads == reads, "the restore read image data from Glance"
        uuid = restored["root"]["uuid"]
        assert vdi_sha512(fake, uuid, record["size"]) == record["os_hash_value"]
        bases = {r["other_config"]["nti_image_id"] for r in our_vdis(fake, "base")}
        assert bases == {image.id, snap_id}
    finally:
        glance_server.client().images.delete(snap_id)


def test_xenapi_upload_while_glance_is_down_completes_after_a_restart(
    xenserver,  # noqa: F811
    make_image,
    hosts,
    glance,
    glance_server,
    tmp_path,
):
    fake, session = xenserver
    image = make_image(8 * MiB)
    compute = hosts("compute-1", glance_retries=1, glance_retry_delay=0.05)
    current = {"glance": glance}
    handler = make_handler(GlanceImageHandler, compute, glance, fake, tmp_path)
    handler._glance_factory = lambda context: current["glance"]
    root, saved = boot_and_write(fake, session, handler, image.id)
    snap_id = new_snapshot(glance_server)
    try:
        current["glance"] = GlanceClient.for_endpoint(dead_endpoint(), compute.conf, timeout=2)
        handler.upload_image(project(), session, {"name": "vm-1"}, snap_id, [root])

        assert dict(glance_server.client().images.get(snap_id))["status"] == "queued"
        [kept] = our_vdis(fake, "queued-upload")
        assert kept["other_config"]["nti_image_id"] == snap_id
        assert [e.image_id for e in handler.pipeline(session).uploads.list()] == [snap_id]
        handler.shutdown()  # the host process stops, Glance comes back

        restarted = make_handler(GlanceImageHandler, compute, glance, fake, tmp_path)
        assert restarted.pipeline(session).retry_uploads(force=True) == [snap_id]

        record = dict(glance_server.client().images.get(snap_id))
        assert record["status"] == "active"
        assert record["os_hash_value"] == hashlib.sha512(saved).hexdigest()
        assert our_vdis(fake, "queued-upload") == []
        assert restarted.pipeline(session).uploads.list() == []
        counting = CountingGlance(glance)
        restarted._glance_factory = lambda context: counting
        uuid = restarted.download_image(project(), session, {"name": "vm-2"}, snap_id)["root"][
            "uuid"
        ]
        assert counting.data_reads == 0
        assert vdi_sha512(fake, uuid, record["size"]) == record["os_hash_value"]
    finally:
        glance_server.client().images.delete(snap_id)


def _bench():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[2] / "bench" / "snapshots.py"
    spec = importlib.util.spec_from_file_location("bench_snapshots", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_differential_snapshot_moves_a_fraction_of_the_image(glance_server, tmp_path):
    """The acceptance run of bench/snapshots.py, smaller: 5% changed of a 32 MiB image."""
    result = _bench().measure(glance_server, str(tmp_path), 32 * MiB, 0.05)

    full, diff = result["upload"]["full"], result["upload"]["differential"]
    assert full["bytes_to_glance"] >= 32 * MiB and full["disk_format"] == "raw"
    assert diff["disk_format"] == "qcow2"
    assert diff["fraction_of_image"] < 0.10, result
    restore = result["restore_elsewhere"]
    assert restore["fraction_of_image"] < 0.10, result
    assert restore["hash_ok"], result
    assert result["restore_on_saving_host_bytes_from_glance"] == 0


def test_xenapi_chain_of_three_made_by_saves_restores_elsewhere(
    make_image, hosts, glance, glance_server, tmp_path
):
    """P <- S1 <- S2, each a differential save of a disk booted from the one before."""
    image = make_image(8 * MiB)
    made = []

    def xen_host(name):
        fake = FakeXenAPI.create(tmp_path / name, sr_size=GiB, use_loop_devices=False)
        session = fake.session()
        compute = hosts(name, state_dir=str(tmp_path / f"{name}-state"))
        fake.configure(compute.conf)
        compute.conf.set_override("differential_snapshots", True, group="torrent_images")
        handler = GlanceImageHandler(compute.conf, glance_factory=lambda context: glance)
        made.append((fake, session, handler))
        return fake, session, handler

    snaps = []
    try:
        fake, session, handler = xen_host("saver")
        parent = image.id
        for n in (1, 2):
            root, _ = boot_and_write(fake, session, handler, parent)
            ref = [r for r in fake.all_refs("VDI") if fake.get_record("VDI", r)["uuid"] == root][0]
            with open(fake.vdi_path(ref), "r+b") as f:
                f.seek(n * 2 * MiB)
                f.write(f"save {n}".encode() * 1000)
            whole = vdi_bytes(fake, root)
            snap = new_snapshot(glance_server)
            snaps.append(snap)
            handler.upload_image(project(), session, {"name": f"vm-{n}"}, snap, [root])
            record = dict(glance_server.client().images.get(snap))
            assert record["disk_format"] == "qcow2" and record["nti_parent_image"] == parent
            assert record["size"] < MiB
            parent = snap
        s1, s2 = snaps

        other_fake, other_session, other = xen_host("other")
        uuid = other.download_image(project(), other_session, {"name": "r"}, s2)["root"]["uuid"]
        assert vdi_bytes(other_fake, uuid)[: len(whole)] == whole
        bases = {r["other_config"]["nti_image_id"] for r in our_vdis(other_fake, "base")}
        assert bases == {image.id, s1, s2}

        # A missing parent: typed, naming the chain, nothing half-built.
        glance_server.client().images.delete(s1)
        snaps.remove(s1)
        third_fake, third_session, third = xen_host("third")
        with pytest.raises(exception.DeltaChainError) as err:
            third.download_image(project(), third_session, {"name": "r"}, s2)
        assert f"{s1} <- {s2}" in str(err.value) and "not in Glance" in str(err.value)
        assert our_vdis(third_fake, "slot") == [] and our_vdis(third_fake, "base") == []
    finally:
        for snap in snaps:
            glance_server.client().images.delete(snap)
        for fake, session, handler in made:
            handler.shutdown()
            session.xenapi.session.logout()
            assert not fake.leaks().vbds
            fake.close()


_SAVE_IN_A_CHILD = """
import json, sys, types
import XenAPI
from nova_torrent_images.glance.client import GlanceClient
from nova_torrent_images.virt.xenapi.handler import GlanceImageHandler
from nova_torrent_images.testing.swarm import make_conf

args = json.loads(sys.argv[1])
conf = make_conf(state_dir=args["state_dir"], glance_retries=0)
for name in ("xenapi_compute_vm_uuid", "xenapi_device_dir"):
    conf.set_override(name, args[name], group="torrent_images")
glance = GlanceClient.for_endpoint(args["glance"], conf, timeout=2)
session = XenAPI.Session(args["xapi"])
session.login_with_password("root", "secret", "1.0", "child")
handler = GlanceImageHandler(conf, glance_factory=lambda context: glance)
context = types.SimpleNamespace(project_id="p-1", auth_token=None)
handler.upload_image(context, session, {"name": "vm-1"}, args["image_id"], [args["root"]])
handler.shutdown()
session.xenapi.session.logout()
"""


def test_xenapi_queued_upload_survives_the_host_process(
    xenserver,  # noqa: F811
    make_image,
    hosts,
    glance,
    glance_server,
    tmp_path,
):
    """The save runs in a process that ends with Glance down; a new process uploads it."""
    import json
    import subprocess
    import sys

    fake, session = xenserver
    image = make_image(8 * MiB)
    compute = hosts("compute-1")
    handler = make_handler(GlanceImageHandler, compute, glance, fake, tmp_path)
    root, saved = boot_and_write(fake, session, handler, image.id)
    snap_id = new_snapshot(glance_server)
    try:
        args = {
            "state_dir": compute.conf.torrent_images.state_dir,
            "xenapi_compute_vm_uuid": fake.compute_vm_uuid,
            "xenapi_device_dir": str(fake.dev_dir()),
            "glance": dead_endpoint(),
            "xapi": fake.url,
            "image_id": snap_id,
            "root": root,
        }
        subprocess.run(
            [sys.executable, "-c", _SAVE_IN_A_CHILD, json.dumps(args)],
            check=True,
            timeout=120,
        )
        assert dict(glance_server.client().images.get(snap_id))["status"] == "queued"
        [kept] = our_vdis(fake, "queued-upload")
        assert kept["other_config"]["nti_image_id"] == snap_id

        # The host's long-running process (here: a new pipeline in this one) after Glance
        # is back: the queue entry and the kept copy are all it has to go on.
        restarted = make_handler(GlanceImageHandler, compute, glance, fake, tmp_path)
        pipeline = restarted.pipeline(session)
        assert [e.image_id for e in pipeline.uploads.list()] == [snap_id]
        assert pipeline.retry_uploads(force=True) == [snap_id]
        record = dict(glance_server.client().images.get(snap_id))
        assert record["status"] == "active"
        assert record["os_hash_value"] == hashlib.sha512(saved).hexdigest()
        assert our_vdis(fake, "queued-upload") == []
    finally:
        glance_server.client().images.delete(snap_id)


def test_xenapi_saved_snapshot_is_seeded_once_published(
    xenserver,  # noqa: F811
    make_image,
    hosts,
    glance,
    glance_server,
    tmp_path,
):
    from nova_torrent_images.compute.pipeline import fetch_to_file
    from nova_torrent_images.swarm.torrent import make_torrent
    from nova_torrent_images.virt.xenapi.handler import TorrentImageHandler

    fake, session = xenserver
    image = make_image(8 * MiB)
    compute = hosts("compute-1")
    handler = make_handler(TorrentImageHandler, compute, glance, fake, tmp_path)
    root, saved = boot_and_write(fake, session, handler, image.id)
    snap_id = new_snapshot(glance_server)
    try:
        handler.upload_image(project(), session, {"name": "vm-1"}, snap_id, [root])
        pipeline = handler.pipeline(session)
        assert pipeline.store.lookup(snap_id).source == "snapshot"
        assert pipeline.seed_published_snapshots() == []  # not published yet

        # The origin publishes it: a torrent of Glance's bytes, named by the image id.
        published = tmp_path / "published.raw"
        published.write_bytes(b"".join(glance.iter_data(snap_id)))
        torrent = make_torrent(str(published), name=snap_id)
        magnet = torrent.magnet(peers=[compute.endpoint], max_length=None)
        glance_server.client().images.update(snap_id, is_torrentable="true", torrent_magnet=magnet)

        assert pipeline.seed_published_snapshots() == [snap_id]
        assert snap_id in pipeline.seeds.seeding()

        # Another host gets it from the saving host's seed, verified against Glance.
        peer = hosts("peer", stall_timeout=20)
        result = fetch_to_file(
            glance.image_info(snap_id),
            str(tmp_path / "peer.raw"),
            conf=peer.conf,
            glance=None,
            engine=peer.engine,
        )
        assert result.source == "torrent"
        assert (tmp_path / "peer.raw").read_bytes() == saved[: len(published.read_bytes())]
    finally:
        glance_server.client().images.delete(snap_id)
