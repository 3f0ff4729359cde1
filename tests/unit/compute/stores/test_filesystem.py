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

"""FilesystemStore: read-only base copies with sidecars, clones, and crash recovery."""

import hashlib
import json
import os
import shutil
import stat
import subprocess

import pytest

from nova_torrent_images import exception
from nova_torrent_images.compute.stores import filesystem
from nova_torrent_images.compute.stores.base import CommitInfo
from nova_torrent_images.compute.stores.filesystem import FilesystemStore
from nova_torrent_images.testing.images import image_info

DATA = os.urandom(256 * 1024 + 17)


def image(image_id="img-1", data=DATA, **extra):
    return image_info(
        data,
        image_id,
        name="cirros",
        visibility="shared",
        owner="owner-project",
        container_format="bare",
        locations=[{"url": "file:///secret"}],
        hw_disk_bus="scsi",
        **extra,
    )


def sha512(path):
    with open(path, "rb") as f:
        return hashlib.sha512(f.read()).hexdigest()


@pytest.fixture
def store(tmp_path):
    return FilesystemStore(str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def dead_pid():
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def download(store, img, data=DATA, projects=()):
    slot = store.begin_download(img.id, img.size)
    with open(slot.path, "wb") as f:
        f.write(data)
    return store.commit(slot, CommitInfo(img, projects=projects))


def test_commit_makes_a_read_only_base_with_a_sidecar(store):
    img = image()
    slot = store.begin_download(img.id, img.size)
    assert not slot.preallocated and not os.path.exists(slot.path)
    assert os.path.basename(slot.path).startswith(f"img-1.part-{os.getpid()}-")
    with open(slot.path, "wb") as f:
        f.write(DATA)
    base = store.commit(slot, CommitInfo(img, projects=("p1", "p2")))

    data_path = os.path.join(store.directory, "img-1.base")
    assert base.ref == data_path
    assert stat.S_IMODE(os.stat(data_path).st_mode) == 0o444
    assert sha512(data_path) == img.hash_value
    assert not os.path.exists(slot.path)
    assert sorted(os.listdir(store.directory)) == ["img-1.base", "img-1.json"]

    with open(os.path.join(store.directory, "img-1.json")) as f:
        tags = json.load(f)
    assert tags["image_id"] == "img-1" and tags["size"] == len(DATA)
    assert tags["hash_algo"] == "sha512" and tags["hash_value"] == img.hash_value
    assert tags["projects"] == ["p1", "p2"]
    assert tags["record"]["owner"] == "owner-project"
    assert tags["record"]["visibility"] == "shared"
    assert tags["record"]["hw_disk_bus"] == "scsi"  # custom properties are kept
    assert "locations" not in tags["record"]  # secrets are not

    found = store.lookup("img-1")
    assert found is not None and found.matches(img)
    assert found.projects == ("p1", "p2") and found.record == tags["record"]
    assert not found.in_use
    assert [b.image_id for b in store.list()] == ["img-1"]
    assert store.lookup("img-2") is None


def test_abort_leaves_nothing(store):
    slot = store.begin_download("img-1", len(DATA))
    with open(slot.path, "wb") as f:
        f.write(DATA[:1000])
    store.abort(slot)
    assert os.listdir(store.directory) == []
    store.abort(slot)  # a missing part is no error


def test_begin_download_refuses_more_than_free_space(store):
    with pytest.raises(exception.StoreFull, match="img-1"):
        store.begin_download("img-1", store.capacity().free + 1)
    assert os.listdir(store.directory) == []


@pytest.mark.parametrize("bad", ["", "../img", "a/b", ".hidden"])
def test_unusable_image_ids_are_refused(store, bad):
    with pytest.raises(exception.StoreError):
        store.begin_download(bad, 10)


def test_remove_stale_slots_removes_dead_processes_parts_only(store, dead_pid):
    d = store.directory
    dead = os.path.join(d, f"img-1.part-{dead_pid}-123")
    mine = os.path.join(d, f"img-2.part-{os.getpid()}-456")
    init = os.path.join(d, "img-3.part-1-789")  # another live process (pid 1)
    for path in (dead, mine, init):
        with open(path, "wb") as f:
            f.write(b"partial")
    assert store.remove_stale_slots() == 1
    assert not os.path.exists(dead)
    # A starting process must never delete another live process's download.
    assert os.path.exists(mine) and os.path.exists(init)


def test_live_download_survives_a_second_store_starting(store, tmp_path):
    img = image()
    slot = store.begin_download(img.id, img.size)
    with open(slot.path, "wb") as f:
        f.write(DATA[:4096])
    other = FilesystemStore(store.directory)  # another process's store on the same cache
    assert other.remove_stale_slots() == 0
    with open(slot.path, "ab") as f:
        f.write(DATA[4096:])
    base = store.commit(slot, CommitInfo(img))
    assert sha512(base.ref) == img.hash_value


def test_young_base_without_sidecar_is_kept(store):
    path = os.path.join(store.directory, "img-1.base")
    with open(path, "wb") as f:
        f.write(DATA)
    assert store.remove_stale_slots() == 0
    assert os.path.exists(path)  # a commit may be between its rename and its sidecar
    assert store.lookup("img-1") is None  # but it is no base copy


def test_old_base_without_sidecar_is_removed(store, monkeypatch):
    monkeypatch.setattr(filesystem, "UNFINISHED_COMMIT_GRACE", -1)
    orphan = os.path.join(store.directory, "img-1.base")
    with open(orphan, "wb") as f:
        f.write(DATA)
    kept = download(store, image("img-2"))
    assert store.remove_stale_slots() == 1
    assert not os.path.exists(orphan)
    assert os.path.exists(kept.ref)  # a complete base copy is never touched
    assert [b.image_id for b in store.list()] == ["img-2"]


def test_clone_is_a_writable_copy_and_marks_the_base_in_use(store):
    img = image()
    base = download(store, img)
    before = base.last_used
    dest = store.clone(base, "instance-1-root")

    assert dest == os.path.join(store.directory, "instances", "instance-1-root")
    assert sha512(dest) == img.hash_value
    assert stat.S_IMODE(os.stat(dest).st_mode) == 0o644
    with open(dest, "r+b") as f:  # the instance writes its disk ...
        f.write(b"\xff" * 4096)
    assert sha512(base.ref) == img.hash_value  # ... the base copy does not change
    assert stat.S_IMODE(os.stat(base.ref).st_mode) == 0o444

    found = store.lookup("img-1")
    assert found.in_use and found.last_used >= before
    with pytest.raises(exception.StoreError, match="already exists"):
        store.clone(found, "instance-1-root")
    os.unlink(dest)
    assert not store.lookup("img-1").in_use  # clones that are gone do not count


def test_a_hard_link_marks_the_base_in_use(store, tmp_path):
    base = download(store, image())
    os.link(base.ref, tmp_path / "nova-cached-image")
    assert store.lookup("img-1").in_use


def test_add_project_merges_with_what_the_sidecar_has(store):
    download(store, image(), projects=("p1",))
    first, second = store.lookup("img-1"), store.lookup("img-1")  # two stale views
    store.add_project(first, "p2")
    store.add_project(second, "p3")
    store.add_project(second, "p3")  # known: nothing changes
    assert store.lookup("img-1").projects == ("p1", "p2", "p3")


def test_touch_records_the_use(store):
    base = download(store, image())
    base.last_used = 0
    store.touch(base)
    assert store.lookup("img-1").last_used == pytest.approx(base.last_used)
    assert base.last_used > 0


def test_capacity_counts_our_base_copies(store):
    assert store.capacity().ours == 0
    other = os.urandom(1000)
    download(store, image())
    download(store, image("img-2", other), data=other)
    with open(os.path.join(store.directory, "img-3.base"), "wb") as f:
        f.write(b"x" * 5000)  # no sidecar: not ours (yet)
    cap = store.capacity()
    assert cap.ours == len(DATA) + len(other)
    assert 0 < cap.free <= cap.total


def test_destroy_removes_bytes_and_sidecar(store):
    base = download(store, image())
    store.destroy(base)
    assert os.listdir(store.directory) == []
    assert store.lookup("img-1") is None
    store.destroy(base)  # already gone: no error


def test_unreadable_sidecar_is_ignored(store, caplog):
    download(store, image())
    with open(os.path.join(store.directory, "img-1.json"), "w") as f:
        f.write("{not json")
    assert store.list() == [] and store.lookup("img-1") is None
    assert any("unreadable" in r.getMessage() for r in caplog.records)


def test_seed_path_is_the_read_only_base(store):
    base = download(store, image())
    with store.seed_path(base) as path:
        assert path == base.ref
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o444


def test_capabilities():
    caps = FilesystemStore.capabilities
    assert caps.seeds and caps.clones and caps.keeps_base_copies
    assert not caps.writes_in_place and caps.disk_formats is None
    # Snapshots on libvirt hosts (doc/source/snapshots.rst): uploaded through the store,
    # kept, queued, and differential images rebuilt in a copy of the parent.
    assert caps.attach_for_upload and caps.adopts_disks and caps.clone_slots


def test_part_owner_pid():
    assert filesystem.part_owner_pid("img.part-123-456") == 123
    assert filesystem.part_owner_pid(".out.img.part-9-1") == 9
    assert filesystem.part_owner_pid("img.base") is None
    assert filesystem.part_owner_pid("img.part-x-1") is None


# -- snapshots: kept copies, adoption, clones of a parent, overlays ---------------------
def test_a_kept_copy_is_read_only_tagged_and_survives_a_new_store(store, tmp_path):
    nova_file = tmp_path / "extract"  # Nova's file: copied, never linked
    nova_file.write_bytes(DATA)
    kept = store.keep_for_upload(str(nova_file), "snap-1", "p-1")

    assert kept == os.path.join(store.directory, "uploads", "snap-1.disk")
    assert stat.S_IMODE(os.stat(kept).st_mode) == 0o444
    assert os.stat(kept).st_ino != os.stat(nova_file).st_ino
    nova_file.unlink()
    with open(os.path.join(store.directory, "uploads", "snap-1.json")) as f:
        tags = json.load(f)
    assert tags["role"] == "queued-upload" and tags["project"] == "p-1"
    restarted = FilesystemStore(store.directory)
    assert restarted.remove_stale_slots() == 0
    assert restarted.kept_for_upload() == {kept: "snap-1"}
    assert restarted.list() == []  # no base copy
    restarted.drop_kept(kept)
    assert restarted.kept_for_upload() == {}
    assert os.listdir(os.path.join(store.directory, "uploads")) == []
    restarted.drop_kept(kept)  # missing is no error
    with pytest.raises(exception.StoreError):
        restarted.drop_kept(os.path.join(store.directory, "img-1.base"))


def test_a_crash_while_keeping_leaves_what_a_start_removes(store, dead_pid, monkeypatch):
    monkeypatch.setattr(filesystem, "UNFINISHED_COMMIT_GRACE", -1)
    uploads = os.path.join(store.directory, "uploads")
    os.makedirs(uploads)
    half = os.path.join(uploads, f"snap-1.disk.part-{dead_pid}-1")  # copy cut short
    untagged = os.path.join(uploads, "snap-2.disk")  # renamed, tags never written
    for path in (half, untagged):
        with open(path, "wb") as f:
            f.write(b"partial")
    assert store.remove_stale_slots() == 2
    assert os.listdir(uploads) == []


def test_adopting_a_file_of_the_store_links_it(store):
    img = image("snap-1")
    slot = store.begin_download(img.id, img.size)  # e.g. a disk converted for a delta
    with open(slot.path, "wb") as f:
        f.write(DATA)
    kept = store.keep_for_upload(slot.path, img.id, None)
    assert os.stat(kept).st_ino == os.stat(slot.path).st_ino  # no second copy
    os.unlink(slot.path)

    base = store.adopt_disk(kept, CommitInfo(img, source="snapshot"))
    store.drop_kept(kept)

    assert sha512(base.ref) == img.hash_value and base.source == "snapshot"
    assert stat.S_IMODE(os.stat(base.ref).st_mode) == 0o444
    assert os.stat(base.ref).st_nlink == 1 and not store.lookup(img.id).in_use


def test_attached_is_the_file_itself_read_only(store, tmp_path):
    disk = tmp_path / "disk"
    disk.write_bytes(DATA)
    with store.attached(str(disk)) as path:
        assert path == str(disk)
    with pytest.raises(exception.StoreError):
        with store.attached(str(disk), "RW"):
            pass
    with pytest.raises(exception.StoreError):
        with store.attached(str(tmp_path / "missing")):
            pass


def test_begin_from_holds_the_parent_writable_and_grown(store):
    parent = download(store, image())
    slot = store.begin_from(parent, "snap-1", len(DATA) + 4096)
    assert os.path.getsize(slot.path) == len(DATA) + 4096
    with open(slot.path, "r+b") as f:
        assert f.read(len(DATA)) == DATA
        f.write(b"grown")
    assert sha512(parent.ref) == parent.hash_value  # the parent never changes
    store.abort(slot)
    assert sorted(os.listdir(store.directory)) == ["img-1.base", "img-1.json"]


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")
def test_parent_base_of_a_qcow2_overlay_of_a_link_of_the_base(store, tmp_path):
    base = download(store, image())
    nova_base = tmp_path / "_base" / "0123abcd"  # Nova's cache name, a hard link
    nova_base.parent.mkdir()
    os.link(base.ref, nova_base)
    disk = tmp_path / "instance" / "disk"
    disk.parent.mkdir()
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(nova_base), "-F", "raw", str(disk)],
        check=True,
    )
    flat = tmp_path / "flat"
    flat.write_bytes(DATA)

    assert filesystem.qcow2_backing_file(str(disk)) == str(nova_base)
    assert store.parent_base(str(disk)).image_id == "img-1"
    assert store.parent_base(str(flat)) is None  # no qcow2
    assert store.parent_base(str(tmp_path / "missing")) is None
    os.unlink(nova_base)  # the backing file is no base copy of ours any more
    nova_base.write_bytes(DATA)
    assert store.parent_base(str(disk)) is None
