"""The origin seeder follows the registry; a real libtorrent session, no network peers."""

from __future__ import annotations

import os

import libtorrent as lt
import pytest

from nova_torrent_images.origin.publish import Publisher
from nova_torrent_images.origin.seeder import OriginSeeder
from nova_torrent_images.testing.swarm import make_conf, next_loopback_address
from tests.unit.test_origin_publish import IMAGE_ID, FakeGlance

OTHER_ID = "0b1c2d3e-0000-4000-8000-000000000001"


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


def test_super_seeding_can_be_turned_off(publisher):
    publisher.conf.set_override("origin_super_seeding", False, "torrent_images")
    seeder = OriginSeeder(publisher.conf, publisher=publisher).start()
    try:
        handle = seeder._seeds[IMAGE_ID].watch.handle
        assert not handle.status().flags & lt.torrent_flags.super_seeding
    finally:
        seeder.stop()


def test_request_stop_ends_the_loop(publisher):
    seeder = OriginSeeder(publisher.conf, publisher=publisher).start_in_thread()
    thread = seeder._thread
    seeder.request_stop()
    thread.join(timeout=5)
    assert not thread.is_alive()
    seeder.stop()
