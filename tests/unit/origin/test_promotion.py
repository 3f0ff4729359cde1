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

"""Popularity promotion: publishing on the threshold, the image.send endpoint, the hook."""

from __future__ import annotations

import threading

import pytest

from nova_torrent_images import exception
from nova_torrent_images.common.popularity import RequestCounter
from nova_torrent_images.origin import promotion
from nova_torrent_images.origin.registry import PublishedImage, Registry
from nova_torrent_images.testing.swarm import make_conf
from nova_torrent_images.virt.xenapi.handler import record_request
from tests.unit.origin.fakes import IMAGE_ID, OTHER_ID, Clock, FakePublisher


@pytest.fixture
def conf(tmp_path):
    return make_conf(origin_state_dir=str(tmp_path / "origin"), promotion_enabled=True)


@pytest.fixture
def clock():
    return Clock()


def make_promoter(conf, clock, publisher=None):
    registry = Registry(conf.torrent_images.origin_state_dir)
    publisher = publisher or FakePublisher(registry)
    counter = RequestCounter(registry.state_dir, 600, clock=clock)
    return promotion.Promoter(conf, publisher, counter=counter), publisher


def test_ten_requests_in_the_window_publish_nine_do_not(conf, clock):
    promoter, publisher = make_promoter(conf, clock)
    for i in range(9):
        outcome = promoter.record_request(IMAGE_ID)
        assert (outcome.count, outcome.promoted) == (i + 1, False)
        clock.now += 60  # 9 requests over 9 minutes
    assert publisher.published == []

    outcome = promoter.record_request(IMAGE_ID)

    assert outcome.promoted and outcome.count == 10 and outcome.result.status == "published"
    assert publisher.published == [IMAGE_ID]


def test_requests_older_than_the_window_do_not_count(conf, clock):
    promoter, publisher = make_promoter(conf, clock)
    for _ in range(9):
        promoter.record_request(IMAGE_ID)
        clock.now += 60
    clock.now += 61  # the first request is now 10 minutes and 1 s old... and more
    outcome = promoter.record_request(IMAGE_ID)
    assert not outcome.promoted and outcome.count < 10
    assert publisher.published == []


def test_counts_are_per_image(conf, clock):
    promoter, publisher = make_promoter(conf, clock)
    for _ in range(9):
        promoter.record_request(IMAGE_ID)
        promoter.record_request(OTHER_ID)
    assert publisher.published == []
    assert promoter.record_request(OTHER_ID).promoted
    assert publisher.published == [OTHER_ID]


def test_published_images_are_not_counted(conf, clock, tmp_path):
    promoter, _ = make_promoter(conf, clock)
    registry = promoter.registry
    staging = registry.stage(IMAGE_ID)
    registry.commit(staging, PublishedImage(IMAGE_ID, 1, "sha512", "0" * 128, None, "0" * 64, 1, 1))
    assert promoter.record_request(IMAGE_ID).count == 0


def test_publish_failure_is_logged_and_needs_a_new_crossing(conf, clock, caplog):
    registry = Registry(conf.torrent_images.origin_state_dir)
    failing = FakePublisher(
        registry,
        fail=exception.NotPublishable(image_id=IMAGE_ID, reason="its disk format is qcow2"),
    )
    promoter, _ = make_promoter(conf, clock, failing)
    outcomes = [promoter.record_request(IMAGE_ID) for _ in range(10)]
    assert outcomes[-1].promoted and "qcow2" in outcomes[-1].error
    assert "could not be published" in caplog.text
    assert promoter.record_request(IMAGE_ID).count == 1  # counting starts over


def test_image_send_endpoint(conf, clock):
    promoter, publisher = make_promoter(conf, clock)
    endpoint = promotion.ImageSendEndpoint(promoter)
    payload = {
        "bytes_sent": 41126400,
        "image_id": IMAGE_ID,
        "owner_id": "f7c2b2c1a7e84a0a9b1c1d2e3f4a5b6c",
        "receiver_tenant_id": "0d1e2f3a4b5c6d7e8f9a0b1c2d3e4f5a",
        "receiver_user_id": "a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0",
    }
    metadata = {"message_id": "2b2f0b9e-0000-4000-8000-000000000000", "timestamp": "x"}
    for _ in range(10):
        assert endpoint.info({}, "image.localhost", "image.send", payload, metadata) == "handled"
    assert publisher.published == [IMAGE_ID]
    # The filter only lets image.send through; other events are not counted.
    assert endpoint.filter_rule.match({}, "image.localhost", "image.send", metadata, payload)
    assert not endpoint.filter_rule.match({}, "image.localhost", "image.update", metadata, payload)
    assert endpoint.info({}, "image.localhost", "image.send", {"bytes_sent": 1}, metadata)


def test_handler_hook(conf, clock, monkeypatch):
    conf.set_override("promotion_source", "handler", "torrent_images")
    registry = Registry(conf.torrent_images.origin_state_dir)
    publisher = FakePublisher(registry)
    published = threading.Event()
    original = publisher.publish

    def publish(image_id):
        result = original(image_id)
        published.set()
        return result

    publisher.publish = publish
    monkeypatch.setattr(promotion.Publisher, "from_conf", classmethod(lambda cls, c: publisher))
    monkeypatch.setattr(promotion, "_PROMOTERS", {})
    results = [record_request(IMAGE_ID, conf) for _ in range(10)]
    assert results == [False] * 9 + [True]
    assert published.wait(5)  # the publish runs in the background, not in the boot
    assert publisher.published == [IMAGE_ID]


def test_handler_hook_is_a_no_op_unless_chosen(conf, monkeypatch):
    monkeypatch.setattr(promotion, "_PROMOTERS", {})
    for _ in range(20):
        assert record_request(IMAGE_ID, conf) is False  # source: notifications
    conf.set_override("promotion_enabled", False, "torrent_images")
    conf.set_override("promotion_source", "handler", "torrent_images")
    assert record_request(IMAGE_ID, conf) is False
    assert promotion._PROMOTERS == {}


def test_handler_hook_never_raises(conf, monkeypatch, caplog):
    conf.set_override("promotion_source", "handler", "torrent_images")
    monkeypatch.setattr(promotion, "_PROMOTERS", {})
    assert record_request("../../etc/passwd", conf) is False
    assert "not a valid image id" in caplog.text


def test_the_handler_promoter_is_built_once_per_conf(conf, monkeypatch):
    monkeypatch.setattr(promotion, "_PROMOTERS", {})
    first = promotion.handler_promoter(conf)
    assert promotion.handler_promoter(conf) is first and first.background
    assert promotion.handler_promoter(make_conf()) is not first
