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

"""SeedManager on a real libtorrent session: seeds from resume data, limits, shutdown."""

import hashlib
import logging
import os
import time

import libtorrent as lt
import pytest

from nova_torrent_images.compute.seeding.resume import ResumeFiles
from nova_torrent_images.compute.seeding.seeds import SeedManager, SeedSettings
from nova_torrent_images.compute.stores.base import CommitInfo
from nova_torrent_images.compute.stores.filesystem import FilesystemStore
from nova_torrent_images.glance.image import parse_image
from nova_torrent_images.glance.magnet import build_magnet
from nova_torrent_images.swarm.torrent import make_torrent
from nova_torrent_images.swarm.transfer import Transfer
from nova_torrent_images.testing.swarm import SimulatedHost, transfer_settings

MiB = 1024 * 1024


class Published:
    """An image with its torrent, as the origin published it."""

    def __init__(self, tmp_path, image_id, size):
        self.data = os.urandom(size)
        src = tmp_path / "origin" / image_id
        src.parent.mkdir(exist_ok=True)
        src.write_bytes(self.data)
        self.path = src
        self.torrent = make_torrent(str(src), name=image_id)
        self.record = {
            "id": image_id,
            "status": "active",
            "size": size,
            "disk_format": "raw",
            "os_hash_algo": "sha512",
            "os_hash_value": hashlib.sha512(self.data).hexdigest(),
        }

    def image(self, peers=()):
        magnet = build_magnet(
            info_hash_v1=self.torrent.info_hash_v1,
            info_hash_v2=self.torrent.info_hash_v2,
            peers=list(peers),
        )
        return parse_image({**self.record, "is_torrentable": "true", "torrent_magnet": magnet})

    def resume_data(self, host):
        """What a swarm download saves: the info dict and the merkle trees.

        Taken from a short-lived seed of the origin's copy on ``host``.
        """
        watch = host.seed(self.torrent.data, str(self.path))
        try:
            watch.handle.save_resume_data(lt.save_resume_flags_t.save_info_dict)
            saved = watch.wait_for(lt.save_resume_data_alert, 10)
            assert saved is not None, "libtorrent returned no resume data"
            return saved.resume_data
        finally:
            host.engine.remove_torrent(watch)
            host.seeds.remove(watch)


@pytest.fixture
def host():
    with SimulatedHost("seeding-host") as h:
        yield h


@pytest.fixture
def store(tmp_path):
    return FilesystemStore(str(tmp_path / "images"))


@pytest.fixture
def resume(tmp_path):
    return ResumeFiles(str(tmp_path / "seeds"))


def commit(store, published, last_used=None):
    image = published.image()
    slot = store.begin_download(image.id, image.size)
    with open(slot.path, "wb") as f:
        f.write(published.data)
    base = store.commit(slot, CommitInfo(image))
    if last_used is not None:
        base.last_used = last_used
    return base


def manager(store, host, resume, **settings):
    values = {"seed_duration": 3600, "max_seeds": 10, "trackers": ()}
    values.update(settings)
    return SeedManager(SeedSettings(**values), store, host.engine, resume)


def torrents(host):
    return len(host.engine.session.get_torrents())


def test_start_with_resume_data_seeds_the_base_copy(tmp_path, host, store, resume):
    published = Published(tmp_path, "img-1", MiB + 12345)
    base = commit(store, published)
    resume.save("img-1", published.resume_data(host))
    seeds = manager(store, host, resume)
    try:
        assert seeds.start(base) is True
        assert seeds.start(base) is True  # already seeded: nothing added twice
        assert seeds.seeding() == ["img-1"] and torrents(host) == 1

        # Another host fetches it from this seed alone, and gets the image's bytes.
        with SimulatedHost("compute-2") as leecher:
            dest = tmp_path / "fetched"
            settings = transfer_settings(tmp_path / "scratch")
            image = published.image(peers=[host.endpoint])
            job = Transfer(leecher.engine, image, str(dest), settings)
            job.run()
            job.leave()
            assert hashlib.sha512(dest.read_bytes()).hexdigest() == image.hash_value

        # libtorrent adds transferred bytes to its all-time counters on its 1 s tick.
        deadline = time.monotonic() + 5
        while (status := seeds.status()[0]).bytes_up < published.torrent.size:
            assert time.monotonic() < deadline, status
            time.sleep(0.1)
        assert status.seeding and status.image_id == "img-1"
    finally:
        seeds.shutdown()


def test_start_without_resume_data_logs_once_and_does_not_seed(
    tmp_path, host, store, resume, caplog
):
    caplog.set_level(logging.INFO)
    base = commit(store, Published(tmp_path, "img-1", 300_000))
    seeds = manager(store, host, resume)
    assert seeds.start(base) is False
    assert seeds.start(base) is False
    said = [r for r in caplog.records if "no torrent metadata" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.INFO and "img-1" in said[0].getMessage()
    assert seeds.seeding() == [] and torrents(host) == 0


def test_policy_keeps_expired_or_disabled_seeds_off(tmp_path, host, store, resume):
    published = Published(tmp_path, "img-1", 300_000)
    base = commit(store, published)
    resume.save("img-1", published.resume_data(host))
    now = time.time()
    base.last_used = now - 7200
    assert manager(store, host, resume, seed_duration=3600).start(base, now=now) is False
    base.last_used = now
    assert manager(store, host, resume, seed_duration=0).start(base, now=now) is False
    assert manager(store, host, resume, max_seeds=0).start(base, now=now) is False
    assert torrents(host) == 0


def test_max_seeds_evicts_the_least_recently_used_seed(tmp_path, host, store, resume):
    now = time.time()
    bases = {}
    for n, age in enumerate([300, 200, 100, 400]):
        published = Published(tmp_path, f"img-{n}", 300_000)
        bases[n] = commit(store, published, last_used=now - age)
        resume.save(f"img-{n}", published.resume_data(host))
    seeds = manager(store, host, resume, max_seeds=2)
    try:
        assert seeds.start(bases[0], now=now) and seeds.start(bases[1], now=now)
        assert seeds.start(bases[2], now=now) is True
        assert sorted(seeds.seeding()) == ["img-1", "img-2"]  # img-0 was used longest ago
        assert torrents(host) == 2  # its torrent left the session
        # Older than every seed: it does not push a more recent one out.
        assert seeds.start(bases[3], now=now) is False
        assert sorted(seeds.seeding()) == ["img-1", "img-2"]
    finally:
        seeds.shutdown()


def test_shutdown_removes_every_seed(tmp_path, host, store, resume):
    seeds = manager(store, host, resume)
    for n in range(2):
        published = Published(tmp_path, f"img-{n}", 300_000)
        resume.save(f"img-{n}", published.resume_data(host))
        commit(store, published)
    assert seeds.resume_all() == 2
    assert sorted(seeds.seeding()) == ["img-0", "img-1"] and torrents(host) == 2
    seeds.shutdown()
    assert seeds.seeding() == [] and torrents(host) == 0
    assert seeds.stop("img-0") is False
