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

"""XenAPIStore against the fake XAPI: base copies as tagged snapshots, and crash recovery."""

import contextlib
import hashlib
import json
import os
import socket
import subprocess

import pytest
import XenAPI

from nova_torrent_images import exception
from nova_torrent_images.compute.locks import ImageLocks
from nova_torrent_images.compute.stores import open_store
from nova_torrent_images.compute.stores.base import CommitInfo
from nova_torrent_images.compute.stores.xenapi import TAG, XenAPIStore
from nova_torrent_images.testing.fake_xenapi import FakeXenAPI, MiB
from nova_torrent_images.testing.images import image_info
from nova_torrent_images.testing.swarm import make_conf

DATA = os.urandom(MiB + 4093)  # not a multiple of the SR's 2 MiB granularity


def image(image_id="img-1", data=DATA):
    return image_info(data, image_id, name="cirros", owner="owner-project", visibility="private")


@pytest.fixture(scope="module")
def dead_owner():
    proc = subprocess.Popen(["true"])
    proc.wait()
    return f"{socket.gethostname()}:{proc.pid}"


class Xen:
    def __init__(self, fake, session, store, conf):
        self.fake, self.session, self.store, self.conf = fake, session, store, conf
        self.x = session.xenapi
        self.baseline = fake.snapshot_state()

    def vdi(self, uuid):
        return self.x.VDI.get_by_uuid(uuid)

    def records(self, role=None):
        recs = [self.fake.get_record("VDI", r) for r in self.fake.all_refs("VDI")]
        return [r for r in recs if role is None or r["other_config"].get(TAG + "role") == role]

    def vdi_sha512(self, uuid, size):
        with open(self.fake.vdi_path(self.vdi(uuid)), "rb") as f:
            return hashlib.sha512(f.read(size)).hexdigest()

    def set_owner(self, cls, ref, owner):
        api = getattr(self.x, cls)
        api.remove_from_other_config(ref, TAG + "owner")
        api.add_to_other_config(ref, TAG + "owner", owner)

    def download(self, img, data=DATA, projects=()):
        slot = self.store.begin_download(img.id, img.size)
        with open(slot.path, "r+b") as f:
            f.write(data)
        return self.store.commit(slot, CommitInfo(img, projects=projects))

    def leaks(self):
        return self.fake.leaks(self.baseline)


@pytest.fixture
def xen(tmp_path):
    fake = FakeXenAPI.create(tmp_path / "xapi", sr_size=64 * MiB, use_loop_devices=False)
    session = fake.session()
    conf = make_conf(state_dir=str(tmp_path / "state"))
    fake.configure(conf)
    store = open_store(conf, "xenapi", session=session)
    try:
        yield Xen(fake, session, store, conf)
    finally:
        session.xenapi.session.logout()
        fake.close()


def test_capabilities_are_declared(xen):
    caps = xen.store.capabilities
    assert caps.writes_in_place and caps.disk_formats == ("raw",)
    assert caps.seeds and caps.clones and caps.attach_for_upload and caps.keeps_base_copies
    assert isinstance(xen.store, XenAPIStore)
    assert "Local storage" in xen.store.name


def test_download_and_commit_make_a_tagged_snapshot(xen):
    img = image()
    slot = xen.store.begin_download(img.id, img.size)
    assert slot.preallocated and os.path.exists(slot.path)
    assert [r["other_config"][TAG + "owner"] for r in xen.records("slot")] == [
        f"{socket.gethostname()}:{os.getpid()}"
    ]
    with open(slot.path, "r+b") as f:
        f.write(DATA)
    base = xen.store.commit(slot, CommitInfo(img, projects=("p1", "p2")))

    rec = xen.fake.get_record("VDI", xen.vdi(base.ref))
    assert rec["is_a_snapshot"] is True
    assert rec["VBDs"] == []  # not attached after the commit
    tags = rec["other_config"]
    assert tags[TAG + "role"] == "base" and tags[TAG + "image_id"] == "img-1"
    assert tags[TAG + "size"] == str(len(DATA))
    assert tags[TAG + "hash_algo"] == "sha512" and tags[TAG + "hash_value"] == img.hash_value
    assert TAG + "owner" not in tags  # the slot's owner tag does not survive
    assert json.loads(tags[TAG + "record"])["owner"] == "owner-project"
    assert tags[TAG + "projects"] == "p1,p2"
    assert xen.vdi_sha512(base.ref, len(DATA)) == img.hash_value

    # The download VDI and its VBD are gone: only the base copy is new.
    report = xen.leaks()
    assert report.vbds == () and [xen.fake.get_record("VDI", r)["uuid"] for r in report.vdis] == [
        base.ref
    ]
    found = xen.store.lookup("img-1")
    assert found is not None and found.matches(img) and not found.in_use
    assert found.projects == ("p1", "p2") and found.record["visibility"] == "private"
    assert [b.ref for b in xen.store.list()] == [base.ref]
    assert xen.store.capacity().ours == len(DATA)


def test_abort_leaves_nothing(xen):
    slot = xen.store.begin_download("img-1", len(DATA))
    with open(slot.path, "r+b") as f:
        f.write(DATA[:4096])
    xen.store.abort(slot)
    assert not xen.leaks().vdis and not xen.leaks().vbds
    xen.store.abort(slot)  # twice: nothing to do, no error
    assert not xen.leaks().vdis


def test_begin_download_larger_than_the_sr_is_store_full(xen):
    with pytest.raises(exception.StoreFull, match="img-1"):
        xen.store.begin_download("img-1", 128 * MiB)
    assert not xen.leaks().vdis


def test_clone_is_a_tagged_instance_disk(xen):
    img = image()
    base = xen.download(img)
    clone_uuid = xen.store.clone(base, "vm-1 root")
    rec = xen.fake.get_record("VDI", xen.vdi(clone_uuid))
    assert rec["other_config"][TAG + "role"] == "instance"
    assert rec["other_config"][TAG + "base"] == base.ref
    assert rec["name_label"] == "vm-1 root"
    assert xen.vdi_sha512(clone_uuid, len(DATA)) == img.hash_value
    found = xen.store.lookup("img-1")
    assert found.in_use  # a clone depends on it
    assert [b.ref for b in xen.store.list()] == [base.ref]  # the clone is no base copy


def test_attached_read_only_gives_a_readable_device(xen):
    base = xen.download(image())
    with xen.store.attached(base.ref, "RO") as path:
        with open(path, "rb") as f:
            assert f.read(len(DATA)) == DATA
        (vbd,) = xen.x.VDI.get_VBDs(xen.vdi(base.ref))
        assert xen.x.VBD.get_mode(vbd) == "RO"
        assert xen.x.VBD.get_currently_attached(vbd)
    assert xen.x.VDI.get_VBDs(xen.vdi(base.ref)) == []
    assert not xen.leaks().vbds


def test_add_project_merges(xen):
    xen.download(image(), projects=("p1",))
    first, second = xen.store.lookup("img-1"), xen.store.lookup("img-1")
    xen.store.add_project(first, "p2")
    xen.store.add_project(second, "p3")
    assert xen.store.lookup("img-1").projects == ("p1", "p2", "p3")


def test_destroy_of_a_seeded_base_is_a_clear_error(xen):
    base = xen.download(image())
    with xen.store.seed_path(base):
        with pytest.raises(exception.StoreError, match="img-1"):
            xen.store.destroy(base)
    xen.store.destroy(base)
    assert xen.store.lookup("img-1") is None
    assert not xen.leaks()


# -- remove_stale_slots: what a kill -9 leaves -----------------------------------------


def test_slot_of_a_dead_process_is_removed_a_live_one_kept(xen, dead_owner):
    crashed = xen.store.begin_download("img-crashed", len(DATA))
    live = xen.store.begin_download("img-live", len(DATA))
    xen.set_owner("VDI", crashed.vdi_ref, dead_owner)
    xen.set_owner("VBD", crashed.vbd_ref, dead_owner)
    base = xen.download(image("img-base"))

    assert xen.store.remove_stale_slots() == 2  # the VBD, then the VDI
    assert [r["other_config"][TAG + "image_id"] for r in xen.records("slot")] == ["img-live"]
    assert os.path.exists(live.path)
    assert xen.store.lookup("img-base").ref == base.ref
    xen.store.abort(live)
    xen.store.destroy(base)
    assert not xen.leaks()


def test_seed_vbd_of_a_dead_process_is_removed(xen, dead_owner):
    base = xen.download(image())
    with contextlib.ExitStack() as killed:
        killed.enter_context(xen.store.seed_path(base))  # seeding when the process dies
        (vbd,) = xen.x.VDI.get_VBDs(xen.vdi(base.ref))
        assert xen.x.VBD.get_other_config(vbd)[TAG + "role"] == "seed"
        xen.set_owner("VBD", vbd, dead_owner)
        with pytest.raises(exception.StoreError):
            xen.store.destroy(base)  # attached: the VDI is in use

        assert xen.store.remove_stale_slots() == 1
        with pytest.raises(XenAPI.Failure):
            xen.x.VBD.get_record(vbd)
        assert xen.store.lookup("img-1").ref == base.ref  # the base copy stays
        xen.store.destroy(base)
    assert xen.store.lookup("img-1") is None
    assert not xen.leaks()


def test_live_seed_vbd_is_kept(xen):
    base = xen.download(image())
    with xen.store.seed_path(base) as path:
        (vbd,) = xen.x.VDI.get_VBDs(xen.vdi(base.ref))
        assert xen.x.VBD.get_mode(vbd) == "RO"  # a base copy is only ever seen read-only
        assert xen.store.remove_stale_slots() == 0
        with open(path, "rb") as f:
            assert f.read(16) == DATA[:16]
    assert not xen.leaks().vbds


def test_clone_a_crash_left_with_base_tags_is_removed_under_the_lock(xen):
    base = xen.download(image())
    half = xen.x.VDI.clone(xen.vdi(base.ref), {})  # crash before the retag
    half_uuid = xen.x.VDI.get_uuid(half)
    assert xen.x.VDI.get_other_config(half)[TAG + "role"] == "base"
    assert [b.ref for b in xen.store.list()] == [base.ref]  # never taken for a base copy

    locks = ImageLocks.in_state_dir(str(xen.conf.torrent_images.state_dir))
    assert xen.store.remove_stale_slots() == 0  # without a lock it cannot tell
    with locks.hold("img-1"):  # a boot is cloning right now
        assert xen.store.remove_stale_slots(try_lock=locks.try_hold) == 0
    assert xen.x.VDI.get_by_uuid(half_uuid) == half

    assert xen.store.remove_stale_slots(try_lock=locks.try_hold) == 1
    with pytest.raises(XenAPI.Failure):
        xen.x.VDI.get_by_uuid(half_uuid)
    assert [b.ref for b in xen.store.list()] == [base.ref]


def test_instance_disk_nobody_took_is_removed(xen, dead_owner):
    base = xen.download(image())
    orphan = xen.store.clone(base, "crashed after the retag")
    taken = xen.store.clone(base, "vm-2 root")
    live = xen.store.clone(base, "being handed to Nova right now")
    xen.set_owner("VDI", xen.vdi(orphan), dead_owner)
    xen.set_owner("VDI", xen.vdi(taken), dead_owner)
    # Nova's VM took this one: a VBD of its own (not ours, no tags), not plugged.
    vm = xen.x.VM.get_by_uuid(xen.fake.compute_vm_uuid)
    nova_vbd = xen.x.VBD.create(
        {
            "VM": vm,
            "VDI": xen.vdi(taken),
            "userdevice": "autodetect",
            "bootable": True,
            "mode": "RW",
            "type": "Disk",
            "empty": False,
            "other_config": {},
            "qos_algorithm_type": "",
            "qos_algorithm_params": {},
        }
    )

    assert xen.store.remove_stale_slots() == 1
    with pytest.raises(XenAPI.Failure):
        xen.vdi(orphan)
    assert xen.x.VDI.get_VBDs(xen.vdi(taken)) == [nova_vbd]
    assert xen.vdi(live)
    assert xen.store.lookup("img-1").ref == base.ref
