"""The seeding policy on a real filesystem store (no swarm needed)."""

import hashlib
import os
import threading
import time

import pytest

from nova_torrent_images import exception
from nova_torrent_images.image import parse_image
from nova_torrent_images.seeding import DownloadQueue, SeedManager
from nova_torrent_images.stores.base import CommitInfo
from nova_torrent_images.stores.filesystem import FilesystemStore
from nova_torrent_images.testing.swarm import make_conf

MiB = 1024 * 1024


def add_base(store, image_id, size=MiB, last_used=None):
    data = os.urandom(size)
    image = parse_image(
        {
            "id": image_id,
            "size": size,
            "os_hash_algo": "sha512",
            "os_hash_value": hashlib.sha512(data).hexdigest(),
        }
    )
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
    return SeedManager(make_conf(state_dir=str(tmp_path), **conf), store, engine=None)


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


def test_stale_slots_removed_base_copies_kept(store):
    add_base(store, "img")
    slot = store.begin_download("other", MiB)
    with open(slot.path, "wb") as f:
        f.write(b"partial")
    assert store.remove_stale_slots() == 1
    assert [b.image_id for b in store.list()] == ["img"]
    assert not os.path.exists(slot.path)


def test_download_queue_is_fifo_and_bounded(caplog):
    queue = DownloadQueue(limit=1)
    order, running, peak = [], [0], [0]
    lock = threading.Lock()
    gate = threading.Event()

    def job(n):
        with queue.slot(f"img-{n}"):
            with lock:
                running[0] += 1
                peak[0] = max(peak[0], running[0])
                order.append(n)
            gate.wait(5)
            with lock:
                running[0] -= 1

    threads = []
    for n in range(4):
        t = threading.Thread(target=job, args=(n,))
        t.start()
        threads.append(t)
        time.sleep(0.05)  # arrival order 0, 1, 2, 3
    gate.set()
    for t in threads:
        t.join()
    assert order == [0, 1, 2, 3] and peak[0] == 1
    assert any("waiting for a download slot" in r.getMessage() for r in caplog.records)
