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

"""The XenServer path: real XenAPI client, our fake XAPI over XML-RPC, real swarms.

A recording wrapper stands in for Nova's ``XenAPISession`` (its ``call_xenapi``), so the
tests also check the one thing a fake cannot show by its state alone: that a base copy is
never attached read-write, at any point.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import threading
import time

import pytest
import XenAPI

from nova_torrent_images import exception
from nova_torrent_images.compute.stores.xenapi import TAG, XenAPIStore
from nova_torrent_images.testing.fake_xenapi import FakeXenAPI, GiB, loop_devices_available
from nova_torrent_images.virt.xenapi.handler import (
    GlanceImageHandler,
    TorrentImageHandler,
    load_handler,
)

MiB = 1024 * 1024


class RecordingSession:
    """Nova's XenAPISession shape (``call_xenapi``) over a real ``XenAPI.Session``.

    One XenAPI.Session is one HTTP connection and not thread-safe; Nova keeps a pool of
    them. Serializing the calls models a pool of one.
    """

    def __init__(self, session: XenAPI.Session) -> None:
        self.session = session
        self.calls: list[tuple[str, tuple]] = []
        self._lock = threading.Lock()

    def call_xenapi(self, method: str, *args):
        with self._lock:
            self.calls.append((method, args))
            target = self.session.xenapi
            for part in method.split("."):
                target = getattr(target, part)
            return target(*args)


class CountingStore(XenAPIStore):
    slot_paths: list[str] = []

    def begin_download(self, image_id, size):
        slot = super().begin_download(image_id, size)
        self.slot_paths.append(slot.path)
        return slot


_HANDLERS: list = []


@pytest.fixture
def xenserver(tmp_path):
    with FakeXenAPI.create(tmp_path / "xapi", sr_size=4 * GiB, sr_name="Local storage") as fake:
        session = XenAPI.Session(fake.start_server())
        session.login_with_password("root", "secret", "1.0", "nova-torrent-images-tests")
        recording = RecordingSession(session)
        try:
            yield fake, recording
        finally:
            while _HANDLERS:  # stop seeding: detaches the read-only views of base copies
                _HANDLERS.pop().shutdown()
            session.xenapi.session.logout()
            report = fake.leaks()
            assert not report.sessions and not report.vbds, str(report)


def make_handler(cls, compute, glance, fake, tmp_path, **conf):
    for name, value in {"state_dir": str(tmp_path / "state"), **conf}.items():
        compute.conf.set_override(name, value, group="torrent_images")
    CountingStore.slot_paths = []

    def store_factory(session):
        return CountingStore(
            session, compute_vm_uuid=fake.compute_vm_uuid, device_dir=str(fake.dev_dir())
        )

    handler = cls(
        compute.conf,
        glance_factory=lambda context: glance,
        store_factory=store_factory,
        engine=compute.engine,
    )
    _HANDLERS.append(handler)
    return handler


def vdi_sha512(fake, vdi_uuid: str, size: int) -> str:
    ref = [r for r in fake.all_refs("VDI") if fake.get_record("VDI", r)["uuid"] == vdi_uuid][0]
    with open(fake.vdi_path(ref), "rb") as f:
        h = hashlib.sha512()
        left = size
        while left:
            chunk = f.read(min(left, 4 * MiB))
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def our_vdis(fake, role: str) -> list[dict]:
    recs = [fake.get_record("VDI", r) for r in fake.all_refs("VDI")]
    return [r for r in recs if r["other_config"].get(TAG + "role") == role]


def assert_never_attached_rw(session: RecordingSession, fake, base_uuid: str) -> None:
    base_ref = [r for r in fake.all_refs("VDI") if fake.get_record("VDI", r)["uuid"] == base_uuid][
        0
    ]
    for method, args in session.calls:
        if method == "VBD.create" and args[0]["VDI"] == base_ref:
            assert args[0]["mode"] == "RO", "a base copy was attached read-write"


@pytest.fixture
def seeded_image(make_image, hosts):
    def make(size=64 * MiB, seeders=2):
        image = make_image(size)
        peers = []
        for i in range(seeders):
            seeder = hosts(f"seeder-{i}")
            seeder.seed(image.torrent.data, image.path)
            peers.append(seeder)
        image.set_magnet(peers=[p.endpoint for p in peers])
        return image, peers

    return make


class CountingGlance:
    """The test's GlanceClient, counting image data reads."""

    def __init__(self, glance):
        self.glance = glance
        self.data_reads = 0

    def __getattr__(self, name):
        return getattr(self.glance, name)

    def iter_data(self, image_id):
        self.data_reads += 1
        return self.glance.iter_data(image_id)

    def download(self, image, destination, **kwargs):
        self.data_reads += 1
        return self.glance.download(image, destination, **kwargs)


def test_first_boot_by_torrent_then_clone(xenserver, seeded_image, hosts, glance, tmp_path):
    fake, session = xenserver
    image, seeders = seeded_image()
    compute = hosts("compute-1")
    counting = CountingGlance(glance)
    handler = make_handler(TorrentImageHandler, compute, counting, fake, tmp_path)

    first = handler.download_image(None, session, {"name": "vm-1"}, image.id)

    root1 = first["root"]["uuid"]
    assert vdi_sha512(fake, root1, image.record["size"]) == image.record["os_hash_value"]
    assert counting.data_reads == 0, "the image came from Glance, not the swarm"
    bases = our_vdis(fake, "base")
    assert len(bases) == 1 and bases[0]["other_config"][TAG + "image_id"] == image.id
    assert bases[0]["is_a_snapshot"]
    assert our_vdis(fake, "slot") == []
    root_rec = [r for r in our_vdis(fake, "instance") if r["uuid"] == root1][0]
    assert root_rec["read_only"] is False
    # The root disk is writable: attach it read-write and write to it.
    store = XenAPIStore(
        session, compute_vm_uuid=fake.compute_vm_uuid, device_dir=str(fake.dev_dir())
    )
    with store.attached(root1, "RW") as path, open(path, "r+b") as f:
        f.write(b"guest data")

    uploaded = sum(s.uploaded_bytes() for s in seeders)
    started = time.monotonic()
    second = handler.download_image(None, session, {"name": "vm-2"}, image.id)
    took = time.monotonic() - started

    root2 = second["root"]["uuid"]
    assert root2 != root1
    assert took < 1.0, f"cache hit took {took:.2f}s"
    assert sum(s.uploaded_bytes() for s in seeders) == uploaded
    assert counting.data_reads == 0
    assert len(CountingStore.slot_paths) == 1
    assert vdi_sha512(fake, root2, image.record["size"]) == image.record["os_hash_value"]
    assert len(our_vdis(fake, "base")) == 1
    assert_never_attached_rw(session, fake, bases[0]["uuid"])


def test_sr_too_small_is_a_clear_error_and_leaks_nothing(tmp_path, make_image, hosts, glance):
    image = make_image(64 * MiB)
    image.set_magnet()
    compute = hosts("compute-1")
    with FakeXenAPI.create(tmp_path / "xapi", sr_size=32 * MiB, sr_name="Tiny SR") as fake:
        baseline = fake.snapshot_state()
        session = XenAPI.Session(fake.start_server())
        session.login_with_password("root", "secret", "1.0", "tests")
        handler = make_handler(TorrentImageHandler, compute, glance, fake, tmp_path)
        try:
            with pytest.raises(exception.StoreFull) as ctx:
                handler.download_image(None, RecordingSession(session), {"name": "vm"}, image.id)
        finally:
            session.xenapi.session.logout()
        message = str(ctx.value)
        assert "Tiny SR" in message and image.id in message
        assert str(64 * MiB) in message and "free" in message
        fake.check_leaks(baseline)


def test_concurrent_boots_share_one_download(xenserver, seeded_image, hosts, glance, tmp_path):
    fake, session = xenserver
    image, seeders = seeded_image(32 * MiB)
    compute = hosts("compute-1")
    handler = make_handler(TorrentImageHandler, compute, glance, fake, tmp_path)
    roots, errors = [], []

    def boot(n):
        try:
            roots.append(
                handler.download_image(None, session, {"name": f"vm-{n}"}, image.id)["root"]["uuid"]
            )
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=boot, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert errors == []
    assert len(set(roots)) == 4
    assert len(CountingStore.slot_paths) == 1, "more than one swarm download"
    assert sum(s.uploaded_bytes() for s in seeders) < 1.1 * 32 * MiB
    assert len(our_vdis(fake, "base")) == 1
    for root in roots:
        assert vdi_sha512(fake, root, image.record["size"]) == image.record["os_hash_value"]


@pytest.mark.skipif(not loop_devices_available(), reason="needs root and loop devices")
def test_download_goes_through_a_real_block_device(
    xenserver, seeded_image, hosts, glance, tmp_path
):
    fake, session = xenserver
    assert fake.use_loop_devices
    image, _ = seeded_image(16 * MiB, seeders=1)
    compute = hosts("compute-1")

    seen = {}

    class DeviceCheckingStore(CountingStore):
        def commit(self, slot, info):
            real = os.path.realpath(slot.path)
            seen["device"] = real
            seen["is_block"] = stat.S_ISBLK(os.stat(real).st_mode)
            return super().commit(slot, info)

    handler = TorrentImageHandler(
        compute.conf,
        glance_factory=lambda c: glance,
        engine=compute.engine,
        store_factory=lambda s: DeviceCheckingStore(
            s, compute_vm_uuid=fake.compute_vm_uuid, device_dir=str(fake.dev_dir())
        ),
    )
    _HANDLERS.append(handler)
    compute.conf.set_override("state_dir", str(tmp_path / "state"), group="torrent_images")
    root = handler.download_image(None, session, {"name": "vm"}, image.id)["root"]["uuid"]

    assert seen["is_block"] and seen["device"].startswith("/dev/loop")
    assert vdi_sha512(fake, root, image.record["size"]) == image.record["os_hash_value"]


def test_swarm_failure_falls_back_to_plain_handler(
    xenserver, make_image, hosts, glance, tmp_path, caplog
):
    fake, session = xenserver
    image = make_image(16 * MiB)
    image.set_magnet()  # nobody seeds it
    compute = hosts("compute-1")
    handler = make_handler(TorrentImageHandler, compute, glance, fake, tmp_path, metadata_timeout=2)
    caplog.set_level(logging.INFO)

    root = handler.download_image(None, session, {"name": "vm"}, image.id)["root"]["uuid"]

    assert vdi_sha512(fake, root, image.record["size"]) == image.record["os_hash_value"]
    assert len(CountingStore.slot_paths) == 2  # the swarm's slot, then the plain one
    assert our_vdis(fake, "slot") == []
    assert len(our_vdis(fake, "base")) == 1
    assert any("download VDI destroyed" in r.getMessage() for r in caplog.records)


def test_plain_glance_handler_and_upload(
    xenserver, make_image, hosts, glance, glance_server, tmp_path
):
    fake, session = xenserver
    image = make_image(8 * MiB)
    compute = hosts("compute-1")
    handler = make_handler(GlanceImageHandler, compute, glance, fake, tmp_path)

    root = handler.download_image(None, session, {"name": "vm"}, image.id)["root"]["uuid"]
    assert vdi_sha512(fake, root, image.record["size"]) == image.record["os_hash_value"]

    client = glance_server.client()
    snapshot = client.images.create(name="snap", disk_format="raw", container_format="bare")
    try:
        handler.upload_image(None, session, {"name": "vm"}, snapshot["id"], [root])
        uploaded = dict(client.images.get(snapshot["id"]))
        assert uploaded["status"] == "active"
        data = b"".join(client.images.data(snapshot["id"]))
        with open(image.path, "rb") as f:
            original = f.read()
        assert data[: len(original)] == original
    finally:
        client.images.delete(snapshot["id"])


def test_handlers_load_by_name(hosts, tmp_path):
    compute = hosts("compute-1", state_dir=str(tmp_path))
    assert type(load_handler("torrent", compute.conf)) is TorrentImageHandler
    assert type(load_handler("glance", compute.conf)) is GlanceImageHandler
    compute.conf.set_override("image_handler", "glance", group="torrent_images")
    assert type(load_handler(conf=compute.conf)) is GlanceImageHandler
    with pytest.raises(exception.ConfigError, match="image_handler"):
        load_handler("bittorrent", compute.conf)


def test_store_takes_a_plain_xenapi_session(tmp_path):
    with FakeXenAPI.create(tmp_path / "xapi", sr_size=GiB, use_loop_devices=False) as fake:
        session = fake.session()  # a real XenAPI.Session, not Nova's call_xenapi wrapper
        try:
            store = XenAPIStore(
                session, compute_vm_uuid=fake.compute_vm_uuid, device_dir=str(fake.dev_dir())
            )
            assert store.capacity().total == GiB and store.list() == []
        finally:
            session.xenapi.session.logout()
        fake.check_leaks()


def test_restart_removes_downloads_of_dead_processes(tmp_path):
    import socket
    import subprocess
    import sys

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    with FakeXenAPI.create(tmp_path / "xapi", sr_size=GiB, use_loop_devices=False) as fake:
        session = fake.session()
        try:
            store = XenAPIStore(
                session, compute_vm_uuid=fake.compute_vm_uuid, device_dir=str(fake.dev_dir())
            )
            crashed = store.begin_download("img-crashed", 8 * 1024 * 1024)  # still plugged
            live = store.begin_download("img-live", 8 * 1024 * 1024)
            ref = crashed.vdi_ref
            session.xenapi.VDI.remove_from_other_config(ref, TAG + "owner")
            session.xenapi.VDI.add_to_other_config(
                ref, TAG + "owner", f"{socket.gethostname()}:{dead}"
            )
            assert store.remove_stale_slots() == 1
            assert [r["other_config"][TAG + "image_id"] for r in our_vdis(fake, "slot")] == [
                "img-live"
            ]
            store.abort(live)
        finally:
            session.xenapi.session.logout()
        fake.check_leaks()
