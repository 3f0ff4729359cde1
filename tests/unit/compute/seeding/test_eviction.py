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

"""The eviction policy on a real filesystem store (no swarm needed)."""

import os
import time

import pytest

from nova_torrent_images import exception
from nova_torrent_images.compute.locks import ImageLocks
from nova_torrent_images.compute.seeding.eviction import EvictionPolicy, EvictionSettings
from nova_torrent_images.compute.seeding.resume import ResumeFiles
from nova_torrent_images.compute.stores.base import CommitInfo
from nova_torrent_images.compute.stores.filesystem import FilesystemStore
from nova_torrent_images.testing.images import image_info
from nova_torrent_images.testing.swarm import make_conf

MiB = 1024 * 1024


def add_base(store, image_id, size=MiB, last_used=None):
    data = os.urandom(size)
    image = image_info(data, image_id)
    slot = store.begin_download(image_id, size)
    with open(slot.path, "wb") as f:
        f.write(data)
    base = store.commit(slot, CommitInfo(image))
    if last_used is not None:
        store._update_tags(base, last_used=last_used)
    return store.lookup(image_id)


@pytest.fixture
def store(tmp_path):
    return FilesystemStore(str(tmp_path / "images"))


def manager(store, tmp_path, **conf):
    conf = make_conf(state_dir=str(tmp_path), **conf)
    return EvictionPolicy(
        EvictionSettings.from_conf(conf),
        store,
        ResumeFiles.in_state_dir(str(tmp_path)),
        try_lock=ImageLocks.in_state_dir(str(tmp_path)).try_hold,
    )


def test_max_age_deletes_only_unused(store, tmp_path):
    now = time.time()
    old = add_base(store, "old", last_used=now - 7200)
    used = add_base(store, "used", last_used=now - 7200)
    store.clone(used, "vm-1")
    store._update_tags(store.lookup("used"), last_used=now - 7200)
    add_base(store, "fresh", last_used=now)
    seeds = manager(store, tmp_path, base_copy_max_age=3600)

    planned = seeds.prune(dry_run=True, now=now)
    assert [(a.image_id, a.action) for a in planned] == [("old", "delete")]
    assert store.lookup("old") is not None  # dry run changed nothing
    seeds.prune(now=now)
    assert {b.image_id for b in store.list()} == {"used", "fresh"}
    assert not os.path.exists(old.ref)


def test_free_space_floor_and_quota_order(store, tmp_path):
    now = time.time()
    for i, age in enumerate([300, 200, 100]):
        add_base(store, f"img-{i}", last_used=now - age)
    seeds = manager(store, tmp_path, store_quota=2)  # 2 MiB for three 1 MiB images
    actions = seeds.prune(now=now)
    assert [a.image_id for a in actions] == ["img-0"]
    assert "store_quota" in actions[0].reason
    seeds.make_room("next", MiB)
    assert {b.image_id for b in store.list()} == {"img-2"}


def test_evict_refuses_in_use_and_unknown(store, tmp_path):
    base = add_base(store, "img")
    store.clone(base, "vm")
    seeds = manager(store, tmp_path)
    with pytest.raises(exception.StoreError, match="in use"):
        seeds.evict("img")
    with pytest.raises(exception.StoreError, match="nope"):
        seeds.evict("nope")


def test_a_base_copy_a_boot_holds_is_not_evicted(store, tmp_path):
    """Between finding a base copy and cloning it, a boot holds the image lock."""
    now = time.time()
    add_base(store, "held", last_used=now - 300)
    add_base(store, "free", last_used=now - 200)
    policy = manager(store, tmp_path, store_quota=1)
    locks = ImageLocks.in_state_dir(str(tmp_path))
    with locks.hold("held"):
        done = policy.make_room("next", MiB)
    assert [a.image_id for a in done] == ["free"]
    assert store.lookup("held") is not None


def test_concurrent_downloads_count_against_the_quota(store, tmp_path):
    now = time.time()
    for i in range(3):
        add_base(store, f"img-{i}", last_used=now - 100 + i)
    policy = manager(store, tmp_path, store_quota=4)
    # One more MiB fits the quota alone, not with 2 MiB of another download running.
    assert policy.make_room("next", MiB) == []
    done = policy.make_room("next", MiB, in_flight=2 * MiB)
    assert [a.image_id for a in done] == ["img-0", "img-1"]
