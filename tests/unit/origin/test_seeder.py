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

"""The origin seeder follows the registry; a real libtorrent session, no network peers."""

from __future__ import annotations

import dataclasses
import logging
import os

import libtorrent as lt
import pytest

from nova_torrent_images.origin.publisher import Publisher
from nova_torrent_images.origin.seeder import OriginSeeder
from nova_torrent_images.swarm.engine import AlertEvent
from nova_torrent_images.testing.swarm import make_conf, next_loopback_address
from tests.unit.origin.fakes import IMAGE_ID, OTHER_ID, FakeGlance


@pytest.fixture
def publisher(tmp_path):
    conf = make_conf(
        origin_state_dir=str(tmp_path / "origin"),
        origin_advertise_addresses=["127.0.0.1:6881"],
        origin_upload_rate_limit=2048,
        listen_interfaces=[f"{next_loopback_address()}:0"],
    )
    glance = FakeGlance()
    glance.add(IMAGE_ID)
    glance.add(OTHER_ID)
    publisher = Publisher(conf, glance)
    publisher.publish(IMAGE_ID)
    return publisher


@pytest.fixture
def seeder(publisher):
    seeder = OriginSeeder(publisher.conf, publisher=publisher).start()
    yield seeder
    seeder.stop()


def test_seeds_the_registry_throttled_with_initial_seeding(seeder):
    assert seeder.seeded() == [IMAGE_ID]
    handle = seeder._seeds[IMAGE_ID].watch.handle
    flags = handle.status().flags
    assert flags & lt.torrent_flags.super_seeding and flags & lt.torrent_flags.seed_mode
    assert not flags & lt.torrent_flags.paused
    settings = seeder.engine.session.get_settings()
    assert settings["upload_rate_limit"] == 2048 * 1024
    # Hosts join in upload mode: the origin must not drop them as "redundant".
    assert settings["close_redundant_connections"] is False
    assert handle.torrent_file().name() == IMAGE_ID
    assert [s.image_id for s in seeder.stats()] == [IMAGE_ID]


def test_follows_publish_and_unpublish(seeder, publisher):
    publisher.publish(OTHER_ID)
    seeder.sync()
    assert seeder.seeded() == sorted([IMAGE_ID, OTHER_ID])
    publisher.unpublish(IMAGE_ID)
    seeder.sync()
    assert seeder.seeded() == [OTHER_ID]


def test_missing_data_without_web_seed_is_reported_and_retried(publisher, caplog):
    os.unlink(publisher.registry.get(IMAGE_ID).data_path)
    seeder = OriginSeeder(publisher.conf, publisher=publisher).start()
    try:
        assert seeder.seeded() == []
        assert "data of image" in caplog.text and "origin_web_seed" in caplog.text
        assert IMAGE_ID in seeder._retry_at
    finally:
        seeder.stop()


@pytest.mark.parametrize(
    "setting,stripes,expected",
    [
        (False, False, False),
        ("False", False, False),
        ("true", True, True),
        ("auto", False, True),  # hosts use the BitTorrent port: one copy per piece
        ("auto", True, False),  # only other clients use it: served at once
    ],
)
def test_super_seeding_follows_the_setting_and_the_stripes(publisher, setting, stripes, expected):
    publisher.conf.set_override("origin_super_seeding", setting, "torrent_images")
    if stripes:
        publisher.conf.set_override("origin_stripe_listen", "127.0.0.1:0", "torrent_images")
    seeder = OriginSeeder(publisher.conf, publisher=publisher).start()
    try:
        handle = seeder._seeds[IMAGE_ID].watch.handle
        assert bool(handle.status().flags & lt.torrent_flags.super_seeding) is expected
        assert seeder.super_seeding is expected
    finally:
        seeder.stop()


def test_request_stop_ends_the_loop(publisher):
    seeder = OriginSeeder(publisher.conf, publisher=publisher).start_in_thread()
    thread = seeder._thread
    seeder.request_stop()
    thread.join(timeout=5)
    assert not thread.is_alive()
    seeder.stop()


def test_seeder_code_does_not_import_libtorrent():
    import nova_torrent_images.origin.seeder as module

    with open(module.__file__, encoding="utf-8") as f:
        source = f.read()
    assert "import libtorrent" not in source and "lt." not in source


def test_a_broken_torrent_file_is_reported_and_retried(publisher, caplog):
    entry = publisher.registry.get(IMAGE_ID)
    with open(entry.torrent_path, "wb") as f:
        f.write(b"not bencoded")
    seeder = OriginSeeder(publisher.conf, publisher=publisher).start()
    try:
        assert seeder.seeded() == []
        assert "not a valid torrent" in caplog.text and IMAGE_ID in seeder._retry_at
    finally:
        seeder.stop()


def test_storage_errors_stop_seeding_until_the_retry(seeder, caplog):
    seeded = seeder._seeds[IMAGE_ID]
    error = AlertEvent(lt.file_error_alert, "file_error: No such file or directory")
    seeder._on_alert(seeded, error)
    seeder._on_alert(seeded, error)  # a second alert of the same batch is ignored
    assert seeder.seeded() == [] and IMAGE_ID in seeder._retry_at
    assert caplog.text.count("libtorrent storage error") == 1
    seeder.sync()
    assert seeder.seeded() == []  # not before RETRY_AFTER
    seeder._retry_at[IMAGE_ID] = 0
    seeder.sync()
    assert seeder.seeded() == [IMAGE_ID]


def test_tracker_problems_are_logged_once_until_a_reply(seeder, caplog):
    seeded = seeder._seeds[IMAGE_ID]
    failed = AlertEvent(lt.tracker_error_alert, "tracker down")
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            seeder._on_alert(seeded, failed)
        seeder._on_alert(seeded, AlertEvent(lt.url_seed_alert, "web seed refused"))
        assert caplog.text.count("tracker down") == 1 and "web seed refused" in caplog.text
        seeder._on_alert(seeded, AlertEvent(lt.tracker_reply_alert, "received peers"))
        seeder._on_alert(seeded, failed)
        assert caplog.text.count("tracker down") == 2
    seeder._on_alert(seeded, AlertEvent(lt.hash_failed_alert, "hash failed", piece_index=3))
    assert "piece 3 of the published data" in caplog.text
    assert seeder.seeded() == [IMAGE_ID]


class FinishedWatch:
    """A real watch whose download reports finished (the web seed is unreachable here)."""

    def __init__(self, watch) -> None:
        self.watch = watch
        self.flushes = 0

    def __getattr__(self, name):
        return getattr(self.watch, name)

    def counters(self):
        return dataclasses.replace(self.watch.counters(), finished=True)

    def flush(self, timeout, on_other=None):
        self.flushes += 1
        return True


@pytest.fixture
def redownloading(publisher):
    """A seeder re-downloading IMAGE_ID through the (unreachable) Glance web seed."""
    publisher.conf.set_override("origin_web_seed", True, "torrent_images")
    publisher.conf.set_override("glance_endpoint", "http://127.0.0.1:9", "torrent_images")
    entry = publisher.registry.get(IMAGE_ID)
    with open(entry.data_path, "rb") as f:
        data = f.read()
    os.unlink(entry.data_path)
    seeder = OriginSeeder(publisher.conf, publisher=publisher).start()
    seeded = seeder._seeds[IMAGE_ID]
    assert seeded.mode == "web-seed download"
    assert seeded.partial_path == entry.data_path + ".partial"
    seeded.watch = FinishedWatch(seeded.watch)
    yield seeder, seeded, data
    seeder.stop()


def test_a_finished_redownload_is_flushed_verified_and_seeded(redownloading, caplog):
    seeder, seeded, data = redownloading
    watch = seeded.watch
    with open(seeded.partial_path, "wb") as f:
        f.write(data)
    with caplog.at_level(logging.INFO):
        seeder._maybe_finish_download(seeded)
    assert watch.flushes == 1
    entry = seeded.entry
    assert entry.has_data() and not os.path.exists(entry.data_path + ".partial")
    assert seeder._seeds[IMAGE_ID].mode == "seed"
    assert "re-downloaded" in caplog.text and "verified" in caplog.text


def test_a_redownload_that_does_not_match_glance_is_discarded(redownloading, caplog):
    seeder, seeded, data = redownloading
    partial = seeded.partial_path
    with open(partial, "wb") as f:
        f.write(b"x" * len(data))
    seeder._maybe_finish_download(seeded)
    assert "does not match Glance" in caplog.text
    assert not os.path.exists(partial) and not seeded.entry.has_data()
    assert seeder.seeded() == [] and IMAGE_ID in seeder._retry_at
