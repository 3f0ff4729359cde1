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

"""The XenAPI image handlers on the fake XAPI with a stub Glance (no swarm, no glance-api)."""

import hashlib
import os
import subprocess
import sys

import pytest

from nova_torrent_images import exception
from nova_torrent_images.compute.stores.output import OutputFileStore
from nova_torrent_images.compute.stores.xenapi import TAG
from nova_torrent_images.glance.client import GlanceClient
from nova_torrent_images.swarm import engine as swarm_engine
from nova_torrent_images.testing.fake_xenapi import FakeXenAPI, MiB
from nova_torrent_images.testing.swarm import make_conf
from nova_torrent_images.virt.xenapi.handler import (
    GlanceImageHandler,
    TorrentImageHandler,
    load_handler,
)

DATA = os.urandom(MiB + 777)
RECORD = {
    "id": "img-1",
    "name": "cirros",
    "status": "active",
    "size": len(DATA),
    "disk_format": "raw",
    "container_format": "bare",
    "os_hash_algo": "sha512",
    "os_hash_value": hashlib.sha512(DATA).hexdigest(),
}


class StubGlance(GlanceClient):
    """One image record and its bytes; records what was asked and uploaded."""

    def __init__(self, record=RECORD, body=DATA):
        super().__init__(client=None)
        self.record, self.body = dict(record), body
        self.data_requests = 0
        self.uploads = {}
        self.removed = []  # (image id, property names) asked to go

    def remove_properties(self, image_id, names):
        self.removed.append((image_id, list(names)))
        if image_id == self.record["id"]:
            for name in names:
                self.record.pop(name, None)

    def get_image(self, image_id):
        if image_id != self.record["id"]:
            raise exception.ImageNotFound(image_id=image_id)
        return dict(self.record)

    def iter_data(self, image_id):
        self.data_requests += 1
        return (self.body[i : i + 65536] for i in range(0, len(self.body), 65536))

    def upload(self, image_id, data, size):
        chunks = []
        while chunk := data.read(65536):
            chunks.append(chunk)
        self.uploads[image_id] = (b"".join(chunks), size)


class Host:
    def __init__(self, tmp_path):
        self.fake = FakeXenAPI.create(tmp_path / "xapi", sr_size=64 * MiB, use_loop_devices=False)
        self.session = self.fake.session()
        self.baseline = self.fake.snapshot_state()
        self.conf = make_conf(state_dir=str(tmp_path / "state"))
        self.fake.configure(self.conf)
        self.glance = StubGlance()
        self.handlers = []

    def handler(self, cls=GlanceImageHandler, **overrides):
        for name, value in overrides.items():
            self.conf.set_override(name, value, group="torrent_images")
        handler = cls(self.conf, glance_factory=lambda context: self.glance)
        self.handlers.append(handler)
        return handler

    def vdi(self, uuid):
        return self.session.xenapi.VDI.get_by_uuid(uuid)

    def record(self, uuid):
        return self.fake.get_record("VDI", self.vdi(uuid))

    def read(self, uuid, size=None):
        with open(self.fake.vdi_path(self.vdi(uuid)), "rb") as f:
            return f.read() if size is None else f.read(size)

    def roles(self):
        recs = [self.fake.get_record("VDI", r) for r in self.fake.all_refs("VDI")]
        return sorted(r["other_config"].get(TAG + "role", "") for r in recs)

    def close(self):
        for handler in self.handlers:
            handler.shutdown()
        self.session.xenapi.session.logout()
        self.fake.close()


@pytest.fixture
def host(tmp_path):
    h = Host(tmp_path)
    try:
        yield h
    finally:
        h.close()


def test_download_image_returns_a_clone_holding_the_image(host):
    handler = host.handler()
    result = handler.download_image(None, host.session, {"name": "vm-1"}, "img-1")
    root = result["root"]["uuid"]
    assert set(result) == {"root"}
    assert hashlib.sha512(host.read(root, len(DATA))).hexdigest() == RECORD["os_hash_value"]
    rec = host.record(root)
    assert rec["other_config"][TAG + "role"] == "instance"
    assert rec["name_label"] == "vm-1 root"
    base = host.record(rec["other_config"][TAG + "base"])
    assert base["is_a_snapshot"] and base["other_config"][TAG + "image_id"] == "img-1"
    assert host.roles() == ["base", "instance"]  # no download VDI left
    assert host.glance.data_requests == 1
    leaks = host.fake.leaks(host.baseline)
    assert leaks.vbds == () and len(leaks.vdis) == 2


def test_second_download_is_a_cache_hit(host):
    handler = host.handler()
    first = handler.download_image(None, host.session, {"name": "vm-1"}, "img-1")
    second = handler.download_image(None, host.session, {"uuid": "u-2"}, "img-1")
    assert host.glance.data_requests == 1  # nothing read from Glance the second time
    assert first["root"]["uuid"] != second["root"]["uuid"]
    assert host.read(second["root"]["uuid"], len(DATA)) == DATA
    assert host.record(second["root"]["uuid"])["name_label"] == "u-2 root"
    assert host.roles() == ["base", "instance", "instance"]


def test_upload_image_sends_exactly_the_vdi_bytes(host):
    handler = host.handler()
    root = handler.download_image(None, host.session, {"name": "vm-1"}, "img-1")["root"]["uuid"]
    with open(host.fake.vdi_path(host.vdi(root)), "r+b") as f:
        f.seek(100)
        f.write(b"the instance wrote this")  # the snapshot is what the instance made of it
    expected = host.read(root)

    handler.upload_image(None, host.session, {"name": "vm-1"}, "snap-1", [root])
    data, size = host.glance.uploads["snap-1"]
    assert data == expected and size == len(expected)
    assert host.fake.leaks(host.baseline).vbds == ()  # the read-only view is detached
    # Nova copied the booted image's properties into the snapshot's record; the torrent's
    # and a chain's are wrong for the new bytes and went before them.
    [(image_id, removed)] = host.glance.removed
    assert image_id == "snap-1"
    assert {"is_torrentable", "torrent_magnet", "nti_parent_image"} <= set(removed)


def test_upload_needs_a_store_that_attaches_disks(host, tmp_path):
    handler = GlanceImageHandler(
        host.conf,
        glance_factory=lambda context: host.glance,
        store_factory=lambda session: OutputFileStore(str(tmp_path / "out.raw")),
    )
    with pytest.raises(exception.StoreError, match="snap-1"):
        handler.upload_image(None, host.session, {"name": "vm-1"}, "snap-1", ["some-uuid"])
    assert host.glance.uploads == {}


def test_upload_without_a_vdi_is_a_store_error(host):
    with pytest.raises(exception.StoreError, match="snap-1"):
        host.handler().upload_image(None, host.session, {"name": "vm-1"}, "snap-1", [])
    assert host.glance.uploads == {}


def test_corrupt_glance_data_never_reaches_an_instance(host):
    host.glance.body = DATA[:-1] + bytes([DATA[-1] ^ 1])
    with pytest.raises(exception.IntegrityError, match="img-1"):
        host.handler().download_image(None, host.session, {"name": "vm-1"}, "img-1")
    assert host.roles() == []
    assert not host.fake.leaks(host.baseline)


def test_torrent_handler_with_mode_none_goes_to_glance_without_a_swarm(host):
    engine_before = swarm_engine._ENGINE
    handler = host.handler(TorrentImageHandler, mode="none", seed_duration=0)
    host.glance.record.update(
        is_torrentable="true", torrent_magnet="magnet:?xt=urn:btmh:1220" + "ab" * 32
    )
    root = handler.download_image(None, host.session, {"name": "vm-1"}, "img-1")["root"]["uuid"]
    assert host.read(root, len(DATA)) == DATA
    assert host.glance.data_requests == 1
    assert handler.engine is None and swarm_engine._ENGINE is engine_before  # no session


def test_load_handler_by_name(host):
    assert type(load_handler("glance", host.conf)) is GlanceImageHandler
    assert type(load_handler("torrent", host.conf)) is TorrentImageHandler
    host.conf.set_override("image_handler", "glance", group="torrent_images")
    assert type(load_handler(conf=host.conf)) is GlanceImageHandler


def test_load_handler_unknown_name_is_a_config_error(host):
    with pytest.raises(exception.ConfigError, match=r"\] image_handler: .*'bittorrent'") as exc:
        load_handler("bittorrent", host.conf)
    assert exc.value.kwargs["option"] == "image_handler"


def test_importing_the_handler_loads_no_origin_code():
    code = (
        "import sys, nova_torrent_images.virt.xenapi.handler; "
        "print(sorted(m for m in sys.modules if m.startswith('nova_torrent_images.origin')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out.strip() == "[]"
