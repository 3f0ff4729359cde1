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

"""OutputFileStore: a verified image linked into place, never clobbering, nothing left."""

import hashlib
import os
import subprocess

import pytest

from nova_torrent_images import exception
from nova_torrent_images.compute.stores.base import CommitInfo
from nova_torrent_images.compute.stores.output import OutputFileStore
from nova_torrent_images.testing.images import image_info

DATA = os.urandom(200_000)


def image(image_id="img-1"):
    return image_info(DATA, image_id)


@pytest.fixture
def dest(tmp_path):
    directory = tmp_path / "out"
    directory.mkdir()
    return directory / "disk.img"


@pytest.fixture(scope="module")
def dead_pid():
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def write_slot(store, img, data=DATA):
    slot = store.begin_download(img.id, img.size)
    with open(slot.path, "wb") as f:
        f.write(data)
    return slot


def test_begin_download_refuses_an_existing_destination(dest):
    dest.write_bytes(b"the operator's file")
    store = OutputFileStore(str(dest))
    with pytest.raises(exception.StoreError, match="refusing to overwrite"):
        store.begin_download("img-1", len(DATA))
    assert dest.read_bytes() == b"the operator's file"
    assert os.listdir(dest.parent) == ["disk.img"]


def test_begin_download_refuses_a_dangling_symlink(dest, tmp_path):
    dest.symlink_to(tmp_path / "nowhere")
    with pytest.raises(exception.StoreError, match="refusing to overwrite"):
        OutputFileStore(str(dest)).begin_download("img-1", len(DATA))
    assert dest.is_symlink() and not (tmp_path / "nowhere").exists()


def test_begin_download_needs_the_directory(tmp_path):
    store = OutputFileStore(str(tmp_path / "missing" / "disk.img"))
    with pytest.raises(exception.StoreError, match="does not exist"):
        store.begin_download("img-1", len(DATA))
    assert not (tmp_path / "missing").exists()


def test_commit_links_the_part_into_place(dest):
    store = OutputFileStore(str(dest))
    img = image()
    slot = write_slot(store, img)
    assert os.path.basename(slot.path).startswith(f".disk.img.part-{os.getpid()}-")
    assert not os.path.exists(dest)  # nothing under the final name before the commit
    base = store.commit(slot, CommitInfo(img))
    assert base.ref == str(dest) and base.matches(img)
    assert hashlib.sha512(dest.read_bytes()).hexdigest() == img.hash_value
    assert os.listdir(dest.parent) == ["disk.img"]  # no .part left
    assert os.stat(dest).st_nlink == 1
    assert store.lookup("img-1") is None and store.list() == []  # no registry


def test_abort_leaves_nothing(dest):
    store = OutputFileStore(str(dest))
    slot = write_slot(store, image(), DATA[:1000])
    store.abort(slot)
    assert os.listdir(dest.parent) == []
    store.abort(slot)  # again: no error


def test_commit_refuses_a_destination_that_appeared_meanwhile(dest):
    store = OutputFileStore(str(dest))
    img = image()
    slot = write_slot(store, img)
    dest.write_bytes(b"written by someone else during the download")
    with pytest.raises(exception.StoreError, match="appeared during the download"):
        store.commit(slot, CommitInfo(img))
    assert dest.read_bytes() == b"written by someone else during the download"
    assert os.listdir(dest.parent) == ["disk.img"]  # the part is gone too


def test_stale_parts_of_dead_processes_are_removed_live_ones_kept(dest, dead_pid):
    d = dest.parent
    dead = d / f".disk.img.part-{dead_pid}-1"
    live = d / f".disk.img.part-{os.getpid()}-2"
    other_file = d / f".other.img.part-{dead_pid}-3"  # another output's part: not ours
    unrelated = d / "notes.txt"
    for path in (dead, live, other_file, unrelated):
        path.write_bytes(b"x")
    store = OutputFileStore(str(dest))
    assert store.remove_stale_slots() == 1
    assert sorted(os.listdir(d)) == sorted([live.name, other_file.name, unrelated.name])


def test_remove_stale_slots_without_the_directory(tmp_path):
    assert OutputFileStore(str(tmp_path / "missing" / "x")).remove_stale_slots() == 0


def test_nothing_is_kept_or_destroyed(dest):
    store = OutputFileStore(str(dest))
    img = image()
    base = store.commit(write_slot(store, img), CommitInfo(img))
    with pytest.raises(exception.StoreError):
        store.destroy(base)
    assert dest.exists()
    assert store.capacity().ours == 0
    caps = store.capabilities
    assert not caps.keeps_base_copies and not caps.seeds and not caps.clones


def test_begin_download_refuses_more_than_free_space(dest):
    store = OutputFileStore(str(dest))
    with pytest.raises(exception.StoreFull, match="img-1"):
        store.begin_download("img-1", store.capacity().free + 1)
    assert os.listdir(dest.parent) == []
