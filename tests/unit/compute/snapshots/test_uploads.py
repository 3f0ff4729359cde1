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

"""Snapshots through the XenAPI handler: kept on the saving host, queued while Glance is down.

The fake XAPI and a stub Glance that, like glance-api, records size and sha512 of what it
was sent; the same flows against a real glance-api are in tests/integration/test_snapshots.py.
"""

import hashlib
import json
import os
import types

import pytest

from nova_torrent_images import exception
from nova_torrent_images.cmd import main as cli
from nova_torrent_images.compute.stores.xenapi import TAG
from tests.unit.virt.xenapi.test_handler import DATA, RECORD, Host, StubGlance


class SnapshotGlance(StubGlance):
    """Several records; an upload makes the record active with Glance's size and hash."""

    def __init__(self):
        super().__init__()
        self.records = {RECORD["id"]: dict(RECORD)}
        self.down = False
        self.data = {RECORD["id"]: DATA}

    def create(self, image_id):
        self.records[image_id] = {
            "id": image_id,
            "status": "queued",
            "disk_format": "raw",
            "container_format": "bare",
            "owner": "p-1",
            "visibility": "private",
        }

    def remove_properties(self, image_id, names):
        if self.down:
            raise exception.GlanceUnavailable(
                image_id=image_id, operation="update", attempts=1, reason="refused", option="x"
            )
        self.removed.append((image_id, list(names)))
        for name in names:
            self.records.get(image_id, {}).pop(name, None)

    def get_image(self, image_id):
        if self.down:
            raise exception.GlanceUnavailable(
                image_id=image_id, operation="show", attempts=1, reason="down", option="x"
            )
        if image_id not in self.records:
            raise exception.ImageNotFound(image_id=image_id)
        return dict(self.records[image_id])

    def iter_data(self, image_id):
        self.data_requests += 1
        body = self.data[image_id]
        return (body[i : i + 65536] for i in range(0, len(body), 65536))

    def upload(self, image_id, data, size):
        if self.down:
            data.read(1000)  # part of it went out before the connection broke
            raise exception.GlanceUnavailable(
                image_id=image_id,
                operation="upload data to",
                attempts=4,
                reason="refused",
                option="glance_endpoint",
            )
        super().upload(image_id, data, size)
        body, _ = self.uploads[image_id]
        self.data[image_id] = body
        self.records[image_id].update(
            status="active",
            size=len(body),
            os_hash_algo="sha512",
            os_hash_value=hashlib.sha512(body).hexdigest(),
        )


@pytest.fixture
def host(tmp_path):
    h = Host(tmp_path)
    h.glance = SnapshotGlance()
    try:
        yield h
    finally:
        h.close()


def project(name="p-1"):
    return types.SimpleNamespace(project_id=name, auth_token=None)


def boot_and_write(host, handler):
    root = handler.download_image(project(), host.session, {"name": "vm-1"}, "img-1")
    root = root["root"]["uuid"]
    with open(host.fake.vdi_path(host.vdi(root)), "r+b") as f:
        f.seek(4096)
        f.write(b"the instance wrote this")
    return root


def test_saved_snapshot_restores_on_the_same_host_without_glance(host):
    handler = host.handler()
    root = boot_and_write(host, handler)
    expected = host.read(root)
    host.glance.create("snap-1")

    handler.upload_image(project(), host.session, {"name": "vm-1"}, "snap-1", [root])

    assert host.glance.uploads["snap-1"][0] == expected
    bases = {b.image_id: b for b in handler.pipeline(host.session).store.list()}
    assert set(bases) == {"img-1", "snap-1"}
    assert bases["snap-1"].record["id"] == "snap-1"
    assert bases["snap-1"].projects == ("p-1",)
    reads = host.glance.data_requests
    restored = handler.download_image(project(), host.session, {"name": "vm-2"}, "snap-1")
    assert host.glance.data_requests == reads, "the restore read image data from Glance"
    restored = restored["root"]["uuid"]
    assert hashlib.sha512(host.read(restored, len(expected))).hexdigest() == (
        hashlib.sha512(expected).hexdigest()
    )
    # The instance may go on writing: the base copy is a snapshot, not the disk itself.
    with open(host.fake.vdi_path(host.vdi(root)), "r+b") as f:
        f.write(b"later")
    again = handler.download_image(project(), host.session, {"name": "vm-3"}, "snap-1")
    assert host.read(again["root"]["uuid"], len(expected)) == expected
    assert host.fake.leaks(host.baseline).vbds == ()


def test_glance_recording_other_bytes_keeps_nothing(host):
    handler = host.handler()
    root = boot_and_write(host, handler)
    host.glance.create("snap-1")
    upload = host.glance.upload

    def corrupting(image_id, data, size):
        upload(image_id, data, size)
        host.glance.records[image_id]["os_hash_value"] = "0" * 128

    host.glance.upload = corrupting
    handler.upload_image(project(), host.session, {"name": "vm-1"}, "snap-1", [root])
    assert [b.image_id for b in handler.pipeline(host.session).store.list()] == ["img-1"]


def queued(host):
    return sorted(os.listdir(os.path.join(host.conf.torrent_images.state_dir, "uploads")))


def test_upload_while_glance_is_down_is_queued_and_done_after_a_restart(host, capsys):
    handler = host.handler()
    root = boot_and_write(host, handler)
    expected = host.read(root)
    host.glance.create("snap-1")
    host.glance.down = True

    handler.upload_image(project(), host.session, {"name": "vm-1"}, "snap-1", [root])

    assert queued(host) == ["snap-1.json"]
    path = os.path.join(host.conf.torrent_images.state_dir, "uploads", "snap-1.json")
    with open(path) as f:
        entry = json.load(f)
    assert entry["image_id"] == "snap-1" and entry["attempts"] == 1 and entry["project_id"] == "p-1"
    kept = host.record(entry["ref"])
    assert kept["other_config"][TAG + "role"] == "queued-upload"
    assert kept["other_config"][TAG + "image_id"] == "snap-1"
    assert host.read(entry["ref"]) == expected
    # The instance goes on; the kept copy does not change.
    with open(host.fake.vdi_path(host.vdi(root)), "r+b") as f:
        f.write(b"later")
    # Still down: a retry counts an attempt and backs off.
    pipeline = handler.pipeline(host.session)
    pipeline.write_metrics()
    assert pipeline.metrics.value("nti_queued_uploads") == 1
    assert pipeline.metrics.value("nti_queued_upload_bytes") == len(expected)
    assert pipeline.retry_uploads(force=True) == []
    with open(path) as f:
        assert json.load(f)["attempts"] == 2
    handler.shutdown()

    # A restart: a new handler (and pipeline) with Glance back. Not due yet: nothing.
    host.glance.down = False
    restarted = host.handler()
    pipeline = restarted.pipeline(host.session)
    assert pipeline.retry_uploads() == []
    assert pipeline.retry_uploads(force=True) == ["snap-1"]

    assert host.glance.uploads["snap-1"][0] == expected
    assert queued(host) == []
    pipeline.write_metrics()
    assert pipeline.metrics.value("nti_queued_uploads") == 0
    assert pipeline.metrics.value("nti_queued_upload_bytes") == 0
    assert "queued-upload" not in host.roles()
    reads = host.glance.data_requests
    restored = restarted.download_image(project(), host.session, {"name": "vm-2"}, "snap-1")
    assert host.glance.data_requests == reads
    assert host.read(restored["root"]["uuid"], len(expected)) == expected
    assert host.fake.leaks(host.baseline).vbds == ()


def test_operator_lists_and_cancels_queued_uploads(host, capsys, tmp_path):
    handler = host.handler()
    root = boot_and_write(host, handler)
    host.glance.create("snap-1")
    host.glance.down = True
    handler.upload_image(project(), host.session, {"name": "vm-1"}, "snap-1", [root])
    handler.shutdown()

    conf_file = tmp_path / "nti.conf"
    opts = host.conf.torrent_images
    conf_file.write_text(
        "[torrent_images]\n"
        f"state_dir = {opts.state_dir}\n"
        "store = xenapi\n"
        f"xenapi_connection_url = {host.fake.start_server()}\n"
        "xenapi_connection_username = root\n"
        "xenapi_connection_password = secret\n"
        f"xenapi_compute_vm_uuid = {host.fake.compute_vm_uuid}\n"
        f"xenapi_device_dir = {host.fake.dev_dir()}\n"
    )
    args = ["--config-file", str(conf_file)]
    assert cli.main([*args, "uploads"]) == 0
    out = capsys.readouterr().out
    assert "snap-1" in out and "refused" in out
    assert cli.main([*args, "status"]) == 0
    assert "snap-1" in capsys.readouterr().out
    assert cli.main([*args, "uploads", "cancel", "snap-1"]) == 0
    assert queued(host) == []
    assert "queued-upload" not in host.roles()
    assert cli.main([*args, "uploads", "cancel", "snap-1"]) == 1


def test_a_kept_copy_without_its_queue_entry_is_queued_again(host):
    """A crash between keeping the copy and writing the entry loses nothing."""
    handler = host.handler()
    root = boot_and_write(host, handler)
    expected = host.read(root)
    host.glance.create("snap-1")
    host.glance.down = True
    handler.upload_image(project(), host.session, {"name": "vm-1"}, "snap-1", [root])
    os.unlink(os.path.join(host.conf.torrent_images.state_dir, "uploads", "snap-1.json"))
    host.glance.down = False

    assert handler.pipeline(host.session).retry_uploads(force=True) == ["snap-1"]
    assert host.glance.uploads["snap-1"][0] == expected
    assert "queued-upload" not in host.roles()


def test_the_maintenance_task_retries_a_due_upload(host):
    handler = host.handler()
    root = boot_and_write(host, handler)
    expected = host.read(root)
    host.glance.create("snap-1")
    host.glance.down = True
    handler.upload_image(project(), host.session, {"name": "vm-1"}, "snap-1", [root])
    pipeline = handler.pipeline(host.session)
    assert pipeline.retry_uploads in pipeline.maintenance.tasks
    assert pipeline.maintenance.interval == host.conf.torrent_images.prune_interval
    host.glance.down = False
    pipeline.maintenance.run_once()  # not due yet: the first retry waits 30 s
    assert "snap-1" not in host.glance.uploads
    entry = pipeline.uploads.get("snap-1")
    entry.next_attempt = 0
    pipeline.uploads.save(entry)

    pipeline.maintenance.run_once()

    assert host.glance.uploads["snap-1"][0] == expected
    assert pipeline.uploads.list() == []
