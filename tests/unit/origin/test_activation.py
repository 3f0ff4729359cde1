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

"""Publish on activation: Glance's image.activate / image.delete through oslo.messaging's
real fake transport, the publish queue, and several origin nodes agreeing."""

from __future__ import annotations

import logging
import threading
import time

import oslo_messaging
import pytest
from oslo_config import cfg

from nova_torrent_images import exception
from nova_torrent_images.glance import zones
from nova_torrent_images.glance.magnet import parse_magnet
from nova_torrent_images.origin import activation, promotion
from nova_torrent_images.origin.publisher import Publisher
from nova_torrent_images.origin.registry import Registry
from nova_torrent_images.testing.swarm import make_conf
from tests.unit.origin.fakes import IMAGE_ID, OTHER_ID, FakeGlance

WAIT = 10.0


def node_conf(tmp_path, name: str, **overrides):
    """An origin node's settings: its own registry, the same advertised settings."""
    settings = {
        "origin_state_dir": str(tmp_path / name),
        "origin_trackers": ["http://10.0.0.1:6969/announce"],
        "origin_advertise_addresses": ["10.0.0.2:6881", "10.0.0.3:6881"],
        "origin_stripe_advertise": ["http://10.0.0.2:9480", "http://10.0.0.3:9480"],
        "origin_publish_on_activate": True,
        "promotion_notification_pool": f"nova-torrent-images-{name}",
    }
    settings.update(overrides)
    return make_conf(**settings)


@pytest.fixture
def bus():
    """Glance's side of the fake bus: a notifier on exchange 'glance', topic
    'notifications' (Glance's defaults), and the transport the origin listens on."""
    glance_conf = cfg.ConfigOpts()
    glance_conf([], default_config_files=[])
    oslo_messaging.get_notification_transport(glance_conf, url="fake:/")  # registers options
    glance_conf.set_override("control_exchange", "glance")
    glance_transport = oslo_messaging.get_notification_transport(glance_conf, url="fake:/")
    notifier = oslo_messaging.Notifier(
        glance_transport,
        publisher_id="image.glance-api-1",
        driver="messagingv2",
        topics=["notifications"],
    )
    listen_transport = oslo_messaging.get_notification_transport(cfg.ConfigOpts(), url="fake:/")
    yield notifier, listen_transport
    glance_transport.cleanup()  # the fake exchanges are shared by the process: empty them


def payload(glance: FakeGlance, image_id: str = IMAGE_ID, **fields) -> dict:
    """Glance's notification payload of an image (glance/notifier.py)."""
    record = glance.records[image_id]
    body = {k: record.get(k) for k in ("id", "name", "status", "disk_format", "size", "checksum")}
    body.update(properties={}, tags=[], deleted=False, deleted_at=None)
    body.update(fields)
    return body


def wait_for(condition, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.02)


@pytest.fixture
def glance():
    return FakeGlance()


def listen(conf, publisher, transport):
    return promotion.start_notification_listener(conf, publisher, transport=transport)


def test_activate_publishes_and_delete_unpublishes(tmp_path, glance, bus):
    notifier, transport = bus
    conf = node_conf(tmp_path, "a")
    publisher = Publisher(conf, glance)
    glance.add()
    listener = listen(conf, publisher, transport)
    try:
        assert listener.jobs is not None
        notifier.info({}, "image.activate", payload(glance))
        wait_for(lambda: publisher.registry.get(IMAGE_ID) is not None)
        assert listener.jobs.wait_idle(WAIT)
        entry = publisher.registry.get(IMAGE_ID)
        assert entry.has_data() and glance.downloads == 1
        record = glance.records[IMAGE_ID]
        assert record["is_torrentable"] == "true"
        assert parse_magnet(record["torrent_magnet"]).info_hash_v2 == entry.info_hash_v2
        assert record["torrent_stripes"] == "http://10.0.0.2:9480,http://10.0.0.3:9480"
        assert listener.jobs.done[-1] == (IMAGE_ID, "publish", "published")

        deleted = payload(glance, status="deleted", deleted=True)
        del glance.records[IMAGE_ID]  # Glance deleted it, then told
        notifier.info({}, "image.delete", deleted)
        wait_for(lambda: publisher.registry.get(IMAGE_ID) is None)
        assert listener.jobs.wait_idle(WAIT)
        assert listener.jobs.done[-1] == (IMAGE_ID, "unpublish", "unpublished")
    finally:
        listener.stop()
        listener.wait()


def test_unpublishable_images_are_logged_and_skipped(tmp_path, glance, bus, caplog):
    notifier, transport = bus
    conf = node_conf(tmp_path, "a")
    publisher = Publisher(conf, glance)
    glance.add(IMAGE_ID, disk_format="qcow2")
    glance.add(OTHER_ID, os_hash_value=None, os_hash_algo=None, checksum=None)
    listener = listen(conf, publisher, transport)
    caplog.set_level(logging.INFO, logger="nova_torrent_images.origin.activation")
    try:
        notifier.info({}, "image.activate", payload(glance))  # qcow2: the payload says so
        notifier.info({}, "image.activate", payload(glance, OTHER_ID))  # no hash: publish says
        notifier.info({}, "image.activate", {"name": "no id"})
        notifier.info({}, "image.activate", "not even a dict")
        notifier.info({}, "image.delete", {"id": "../../etc"})
        notifier.info({}, "image.update", payload(glance))  # not ours
        wait_for(lambda: any(OTHER_ID in r.getMessage() for r in caplog.records))
        assert listener.jobs.wait_idle(WAIT)
        assert publisher.registry.list() == [] and glance.downloads == 0
        assert glance.updates == []
        skipped = [r for r in caplog.records if "not published" in r.getMessage()]
        assert {r.levelno for r in skipped} == {logging.INFO}
        assert any(IMAGE_ID in r.getMessage() and "qcow2" in r.getMessage() for r in skipped)
        assert any(OTHER_ID in r.getMessage() for r in skipped)
        # The listener still works after all of that.
        glance.records[IMAGE_ID]["disk_format"] = "raw"
        notifier.info({}, "image.activate", payload(glance))
        wait_for(lambda: publisher.registry.get(IMAGE_ID) is not None)
    finally:
        listener.stop()
        listener.wait()


def test_owner_saying_not_torrentable_is_respected(tmp_path, glance, bus):
    notifier, transport = bus
    conf = node_conf(tmp_path, "a")
    publisher = Publisher(conf, glance)
    glance.add(IMAGE_ID, is_torrentable="false")
    listener = listen(conf, publisher, transport)
    try:
        # The payload may lack the property (older Glance): the record is read as well.
        notifier.info({}, "image.activate", payload(glance))
        wait_for(lambda: listener.jobs.done)
        assert listener.jobs.wait_idle(WAIT)
        assert listener.jobs.done == [(IMAGE_ID, "publish", "skipped")]
        assert publisher.registry.list() == [] and glance.downloads == 0
    finally:
        listener.stop()
        listener.wait()


def test_two_nodes_on_the_bus_publish_one_consistent_set_of_properties(tmp_path, glance, bus):
    """Each node has its own pool, so both get image.activate and both publish."""
    notifier, transport = bus
    nodes = [Publisher(node_conf(tmp_path, name), glance) for name in ("a", "b")]
    glance.add()
    listeners = [listen(p.conf, p, transport) for p in nodes]
    try:
        notifier.info({}, "image.activate", payload(glance))
        for publisher in nodes:
            wait_for(lambda p=publisher: p.registry.get(IMAGE_ID) is not None)
        for listener in listeners:
            assert listener.jobs.wait_idle(WAIT)
        a, b = (p.registry.get(IMAGE_ID) for p in nodes)
        assert a.info_hash_v2 == b.info_hash_v2 and a.magnet == b.magnet
        assert nodes[0].registry.read_torrent(a) == nodes[1].registry.read_torrent(b)
        # Whatever the order the two wrote in, each property got one value only.
        written: dict[str, set[str]] = {}
        for _, props in glance.updates:
            for key, value in props.items():
                written.setdefault(key, set()).add(value)
        assert all(len(values) == 1 for values in written.values()), written
        assert glance.records[IMAGE_ID]["torrent_magnet"] == a.magnet
        assert glance.removals == []
    finally:
        for listener in listeners:
            listener.stop()
            listener.wait()


# -- several nodes, without the bus ----------------------------------------------------
def test_a_second_node_with_the_same_settings_leaves_glance_unchanged(tmp_path, glance):
    first = Publisher(node_conf(tmp_path, "a"), glance)
    second = Publisher(node_conf(tmp_path, "b"), glance)
    glance.add()
    one = first.publish(IMAGE_ID)
    updates, record = list(glance.updates), dict(glance.records[IMAGE_ID])
    two = second.publish(IMAGE_ID)
    # The second node read the image and built its own torrent: the same one.
    assert two.bytes_from_glance == one.size and glance.downloads == 2
    assert (two.magnet, two.info_hash_v1, two.info_hash_v2) == (
        one.magnet,
        one.info_hash_v1,
        one.info_hash_v2,
    )
    a, b = first.registry.get(IMAGE_ID), second.registry.get(IMAGE_ID)
    assert first.registry.read_torrent(a) == second.registry.read_torrent(b)
    assert (a.piece_length, a.num_pieces) == (b.piece_length, b.num_pieces)
    # ... and wrote nothing to Glance: every property already said what it would write.
    assert glance.updates == updates and glance.removals == []
    assert glance.records[IMAGE_ID] == record
    assert second.publish(IMAGE_ID).status == "unchanged"
    assert first.publish(IMAGE_ID).status == "unchanged"


def test_nodes_of_two_zones_write_only_their_own_zone(tmp_path, glance):
    zone_a = Publisher(
        node_conf(tmp_path, "a", origin_zone="a", origin_stripe_advertise=["http://10.1.0.2:9480"]),
        glance,
    )
    zone_b = Publisher(
        node_conf(tmp_path, "b", origin_zone="b", origin_stripe_advertise=["http://10.2.0.2:9480"]),
        glance,
    )
    glance.add()
    one, two = zone_a.publish(IMAGE_ID), zone_b.publish(IMAGE_ID)
    assert one.magnet == two.magnet and one.info_hash_v2 == two.info_hash_v2
    routes = zones.image_routes(glance.records[IMAGE_ID], "torrent_stripes")
    assert routes.by_zone["a"].stripes == ("http://10.1.0.2:9480",)
    assert routes.by_zone["b"].stripes == ("http://10.2.0.2:9480",)
    assert not routes.unusable
    record = dict(glance.records[IMAGE_ID])
    assert zone_a.publish(IMAGE_ID).status == "unchanged"
    assert zone_b.publish(IMAGE_ID).status == "unchanged"
    assert glance.records[IMAGE_ID] == record


# -- the queue -------------------------------------------------------------------------
class SlowPublisher:
    """Publishes that block until released, recording what ran and how many at once."""

    def __init__(self, glance: FakeGlance, registry: Registry) -> None:
        self.glance = glance
        self.registry = registry
        self.opts = make_conf().torrent_images
        self.release = threading.Event()
        self.calls: list[tuple[str, str]] = []
        self.running = 0
        self.most = 0
        self._lock = threading.Lock()

    def _enter(self, what: str, image_id: str) -> None:
        with self._lock:
            self.calls.append((what, image_id))
            self.running += 1
            self.most = max(self.most, self.running)
        self.release.wait(WAIT)
        with self._lock:
            self.running -= 1

    def publish(self, image_id: str):
        self._enter("publish", image_id)
        return type("R", (), {"status": "published", "magnet": "magnet:?"})()

    def unpublish(self, image_id: str, **kwargs):
        self._enter("unpublish", image_id)
        return type("R", (), {"was_published": True})()


@pytest.fixture
def slow(tmp_path, glance):
    glance.add(IMAGE_ID)
    glance.add(OTHER_ID)
    return SlowPublisher(glance, Registry(str(tmp_path / "origin")))


def test_one_job_per_image_at_a_time_and_events_coalesce(slow):
    jobs = activation.PublishQueue(slow, workers=4).start()
    try:
        assert jobs.submit(IMAGE_ID, "publish")
        wait_for(lambda: slow.running == 1)
        # While it publishes: two more events; only the last is done, after it.
        assert jobs.submit(IMAGE_ID, "publish")
        assert jobs.submit(IMAGE_ID, "unpublish")
        time.sleep(0.2)
        assert slow.running == 1  # four workers, but one image
        slow.release.set()
        assert jobs.wait_idle(WAIT)
        assert slow.calls == [("publish", IMAGE_ID), ("unpublish", IMAGE_ID)]
        assert slow.most == 1
    finally:
        jobs.stop()


def test_a_delete_waiting_behind_its_activation_replaces_it(slow):
    jobs = activation.PublishQueue(slow, workers=1).start()
    try:
        jobs.submit(OTHER_ID, "publish")  # the one worker is busy with it
        wait_for(lambda: slow.running == 1)
        jobs.submit(IMAGE_ID, "publish")
        jobs.submit(IMAGE_ID, "unpublish")
        slow.release.set()
        assert jobs.wait_idle(WAIT)
        assert slow.calls == [("publish", OTHER_ID), ("unpublish", IMAGE_ID)]
    finally:
        jobs.stop()


def test_the_queue_is_bounded(slow, caplog):
    jobs = activation.PublishQueue(slow, workers=1, max_pending=1).start()
    try:
        jobs.submit(OTHER_ID, "publish")
        wait_for(lambda: slow.running == 1)
        assert jobs.submit(IMAGE_ID, "publish")
        assert not jobs.submit("another-image", "publish")
        assert any(
            "another-image" in r.getMessage() and "origin_publish_on_activate" in r.getMessage()
            for r in caplog.records
        )
        slow.release.set()
        assert jobs.wait_idle(WAIT)
        assert ("publish", "another-image") not in slow.calls
    finally:
        jobs.stop()


def test_a_publish_waits_for_glance_to_say_active(tmp_path, glance):
    conf = node_conf(tmp_path, "a")
    publisher = Publisher(conf, glance)
    glance.add(status="saving")
    polls = []

    def sleep(seconds: float) -> None:
        polls.append(seconds)
        if len(polls) == 2:
            glance.records[IMAGE_ID]["status"] = "active"

    jobs = activation.PublishQueue(publisher, sleep=sleep)
    assert jobs._run(IMAGE_ID, "publish") == "published"
    assert len(polls) == 2
    glance.add(OTHER_ID, status="saving")
    jobs = activation.PublishQueue(publisher, sleep=lambda s: None, active_wait=0.0)
    assert jobs._run(OTHER_ID, "publish") == "skipped"  # logged at INFO, nothing published
    assert publisher.registry.get(OTHER_ID) is None


def test_failures_are_logged_with_the_setting_and_the_worker_goes_on(tmp_path, glance, caplog):
    conf = node_conf(tmp_path, "a")
    publisher = Publisher(conf, glance)
    glance.add()
    glance.fail_updates = True
    jobs = activation.PublishQueue(publisher)
    assert jobs._run(IMAGE_ID, "publish").startswith("failed")
    message = next(
        r.getMessage() for r in caplog.records if r.name == "nova_torrent_images.origin.activation"
    )
    assert IMAGE_ID in message and "origin_publish_on_activate" in message
    assert "409 Conflict" in message
    assert publisher.registry.get(IMAGE_ID) is None  # the publish undid itself
    glance.fail_updates = False
    assert jobs._run(IMAGE_ID, "publish") == "published"


def test_the_listener_needs_a_job_and_a_publisher(tmp_path):
    conf = node_conf(tmp_path, "a", origin_publish_on_activate=False)
    with pytest.raises(exception.ConfigError, match="origin_publish_on_activate"):
        promotion.start_notification_listener(conf, None, activate=True)
    with pytest.raises(exception.ConfigError, match="no job"):
        promotion.start_notification_listener(conf, object())


def test_the_seeder_runs_one_listener_for_activation(tmp_path, glance, bus):
    """``nova-torrent-images seed`` with origin_publish_on_activate: the image Glance
    activates is published and seeded, and stops being seeded when Glance deletes it."""
    from nova_torrent_images.origin.seeder import OriginSeeder
    from nova_torrent_images.testing.swarm import next_loopback_address

    notifier, _ = bus
    conf = node_conf(tmp_path, "a", listen_interfaces=[f"{next_loopback_address()}:0"])
    oslo_messaging.get_notification_transport(conf, url="fake:/")  # registers transport_url
    conf.set_override("transport_url", "fake:/")
    publisher = Publisher(conf, glance)
    glance.add()
    seeder = OriginSeeder(conf, publisher=publisher).start_in_thread()
    try:
        assert seeder._listener is not None and seeder._listener.jobs is not None
        notifier.info({}, "image.activate", payload(glance))
        wait_for(lambda: seeder.seeded() == [IMAGE_ID])
        deleted = payload(glance, status="deleted", deleted=True)
        del glance.records[IMAGE_ID]
        notifier.info({}, "image.delete", deleted)
        wait_for(lambda: seeder.seeded() == [])
    finally:
        seeder.stop()
    assert seeder._listener is None
