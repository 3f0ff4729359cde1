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

"""The origin side end to end: real glance-api, real opentracker, the origin seeder, and
compute hosts (each its own 127.0.0.x) fetching through the published magnet."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from nova_torrent_images import exception
from nova_torrent_images.common.popularity import RequestCounter
from nova_torrent_images.compute.pipeline import fetch_to_file
from nova_torrent_images.compute.sources.base import FetchResult
from nova_torrent_images.glance.client import GlanceClient
from nova_torrent_images.glance.magnet import parse_magnet
from nova_torrent_images.origin.promotion import ImageSendEndpoint, Promoter
from nova_torrent_images.origin.publisher import Publisher
from nova_torrent_images.origin.seeder import OriginSeeder
from nova_torrent_images.origin.tracker import tracker_hashes
from nova_torrent_images.testing.opentracker import Opentracker
from nova_torrent_images.testing.swarm import make_conf, next_loopback_address

LOG = logging.getLogger(__name__)
MiB = 1024 * 1024
ORIGIN_UPLOAD_KIB = 32 * 1024  # the origin's uplink in these tests: 32 MiB/s
COMPUTE_HOSTS = 6
FETCH_SIZE = 128 * MiB


def sha512_of(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha512").hexdigest()


def write_random(path: str, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 8 * MiB)
            f.write(os.urandom(n))
            left -= n


@pytest.fixture
def raw_image(glance_server, tmp_path):
    """Factory of raw images in Glance (random bytes); deleted afterwards."""
    created = []

    def make(size: int = 4 * MiB, **kwargs) -> dict:
        path = str(tmp_path / f"image-{len(created)}.raw")
        write_random(path, size)
        record = glance_server.create_image(path, **kwargs)
        os.unlink(path)
        created.append(record["id"])
        return record

    yield make
    client = glance_server.client()
    for image_id in created:
        try:
            client.images.delete(image_id)
        except Exception:  # noqa: BLE001  deleted by the test already
            LOG.debug("image %s already gone", image_id, exc_info=True)


class Origin:
    """A Glance node of the tests: conf, publisher and (started on demand) the seeder."""

    def __init__(self, glance_server, state_dir: str, tracker: Opentracker | None, **overrides):
        self.address = next_loopback_address()
        settings = {
            "glance_endpoint": glance_server.url,
            "glance_noauth": True,
            "origin_state_dir": state_dir,
            "origin_upload_rate_limit": ORIGIN_UPLOAD_KIB,
            "origin_check_interval": 0,
            "origin_stats_interval": 5,
            "listen_interfaces": [f"{self.address}:0"],
        }
        if tracker is not None:
            settings.update(
                origin_trackers=[tracker.announce_url],
                tracker_whitelist_path=tracker.whitelist_path,
                tracker_pidfile=tracker.pidfile_path,
            )
        settings.update(overrides)
        self.conf = make_conf(**settings)
        self.glance = GlanceClient.for_endpoint(glance_server.url, self.conf)
        self.publisher = Publisher(self.conf, self.glance)
        self.seeder: OriginSeeder | None = None

    def start_seeder(self) -> OriginSeeder:
        """Start the seeder first: its port goes into the magnets as the x.pe hint."""
        self.seeder = OriginSeeder(self.conf, publisher=self.publisher).start_in_thread()
        host, port = self.seeder.endpoint
        self.conf.set_override(
            "origin_advertise_addresses", [f"{host}:{port}"], group="torrent_images"
        )
        return self.seeder

    def wait_seeding(self, image_id: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while image_id not in self.seeder.seeded():
            assert time.monotonic() < deadline, f"seeder did not pick up {image_id}"
            time.sleep(0.1)

    def stop(self) -> None:
        if self.seeder is not None:
            self.seeder.stop()


@pytest.fixture
def origin(glance_server, tmp_path):
    made: list[Origin] = []

    def make(tracker: Opentracker | None = None, **overrides) -> Origin:
        node = Origin(glance_server, str(tmp_path / f"origin-{len(made)}"), tracker, **overrides)
        made.append(node)
        return node

    yield make
    for node in made:
        node.stop()


def glance_file_bytes(access_log: str, image_id: str, offset: int) -> int:
    """Bytes Glance sent for GET /v2/images/<id>/file after ``offset`` of its access log."""
    pattern = re.compile(rf'"GET /v2/images/{image_id}/file HTTP/[0-9.]+" \d+ (\d+)')
    with open(access_log, encoding="utf-8", errors="replace") as f:
        f.seek(offset)
        return sum(int(m.group(1)) for m in pattern.finditer(f.read()))


def fetch_on_hosts(computes, glance, image_id, tmp_path) -> list[FetchResult]:
    """Every compute host fetches the image at the same time (like a fleet booting)."""
    results: list[FetchResult | BaseException | None] = [None] * len(computes)
    barrier = threading.Barrier(len(computes))

    def boot(index: int) -> None:
        host = computes[index]
        destination = str(tmp_path / host.name / image_id)
        os.makedirs(os.path.dirname(destination))
        try:
            info = glance.image_info(image_id)
            barrier.wait(timeout=30)
            results[index] = fetch_to_file(
                info, destination, conf=host.conf, glance=glance, engine=host.engine
            )
        except BaseException as exc:  # noqa: BLE001  re-raised in the test thread
            results[index] = exc

    threads = [threading.Thread(target=boot, args=(i,)) for i in range(len(computes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results  # type: ignore[return-value]


def run_fleet(origin_node, glance_server, raw_image, hosts, tmp_path):
    record = raw_image(FETCH_SIZE, name="fleet-image")
    image_id = record["id"]
    seeder = origin_node.start_seeder()
    result = origin_node.publisher.publish(image_id)
    assert result.status == "published" and result.bytes_from_glance == FETCH_SIZE
    origin_node.wait_seeding(image_id)
    access_offset = os.path.getsize(glance_server.access_log_path)
    computes = [hosts(f"compute-{i + 1}") for i in range(COMPUTE_HOSTS)]

    started = time.monotonic()
    results = fetch_on_hosts(computes, origin_node.glance, image_id, tmp_path)
    seconds = time.monotonic() - started

    for host, r in zip(computes, results, strict=True):
        assert sha512_of(r.destination) == record["os_hash_value"], host.name
    glance_http = glance_file_bytes(glance_server.access_log_path, image_id, access_offset)
    seeder_upload = seeder.uploaded_bytes(image_id)
    ratio = (glance_http + seeder_upload) / FETCH_SIZE
    summary = (
        f"{COMPUTE_HOSTS} hosts x {FETCH_SIZE // MiB} MiB in {seconds:.1f}s: origin egress "
        f"{ratio:.2f}x the image (seeder {seeder_upload / MiB:.1f} MiB + Glance HTTP "
        f"{glance_http / MiB:.1f} MiB); per host "
        + ", ".join(
            f"{r.source} {r.seconds:.0f}s {r.bytes_from_peers // MiB}/{r.bytes_from_origin // MiB}"
            for r in results
        )
    )
    LOG.info("%s", summary)
    print(summary)  # shown with pytest -s: the numbers behind the 1.5x bound
    return record, results, ratio


def test_six_hosts_fetch_through_tracker(
    origin, tracker, glance_server, raw_image, hosts, tmp_path
):
    node = origin(tracker)
    record, results, ratio = run_fleet(node, glance_server, raw_image, hosts, tmp_path)

    assert all(r.source == "torrent" for r in results), [r.fallback_reason for r in results]
    assert ratio <= 1.5
    magnet = parse_magnet(node.publisher.registry.get(record["id"]).magnet)
    assert magnet.trackers == (tracker.announce_url,)
    # The seeder is known to the tracker as a seed of the published torrent.
    hashes = tracker_hashes(magnet.info_hash_v1, magnet.info_hash_v2)
    assert sum(tracker.scrape(h).get("complete", 0) for h in hashes) >= 1
    # Hosts found each other, not just the origin.
    assert all(r.bytes_from_peers > 0 for r in results)


def test_six_hosts_fetch_without_tracker(origin, glance_server, raw_image, hosts, tmp_path):
    node = origin(tracker=None)
    record, results, ratio = run_fleet(node, glance_server, raw_image, hosts, tmp_path)

    magnet = parse_magnet(node.publisher.registry.get(record["id"]).magnet)
    assert magnet.trackers == () and len(magnet.peers) == 1
    assert all(r.source == "torrent" for r in results), [r.fallback_reason for r in results]
    # Peer exchange from the origin spread the hosts' addresses.
    assert all(r.bytes_from_peers > 0 for r in results)
    assert ratio <= 1.5


def test_tracker_refuses_hashes_never_published(origin, tracker, raw_image):
    node = origin(tracker)
    node.conf.set_override("origin_advertise_addresses", ["127.0.0.1:6881"], "torrent_images")
    record = raw_image(2 * MiB)
    never_published = os.urandom(20).hex()
    assert not tracker.is_allowed(never_published)

    result = node.publisher.publish(record["id"])

    published = tracker_hashes(result.info_hash_v1, result.info_hash_v2)
    assert tracker.whitelisted() == set(published)
    for h in published:  # the v1 hash and the truncated v2 hash
        assert tracker.wait_allowed(h), h
    assert not tracker.is_allowed(never_published)
    answer = tracker.announce(never_published)
    assert b"not authorized" in answer["failure reason"]

    node.publisher.unpublish(record["id"])
    for h in published:
        assert tracker.wait_allowed(h, allowed=False), h


def test_publish_twice_is_a_no_op(origin, tracker, raw_image, glance_server):
    node = origin(tracker)
    node.conf.set_override("origin_advertise_addresses", ["127.0.0.1:6881"], "torrent_images")
    record = raw_image(3 * MiB)
    first = node.publisher.publish(record["id"])
    assert first.status == "published"
    entry = node.publisher.registry.get(record["id"])
    files = [entry.torrent_path, entry.data_path, os.path.join(entry.directory, "meta.json")]
    files.append(tracker.whitelist_path)
    before = {p: os.stat(p).st_mtime_ns for p in files}
    glance_before = node.glance.get_image(record["id"])
    access_offset = os.path.getsize(glance_server.access_log_path)

    second = node.publisher.publish(record["id"])

    assert second.status == "unchanged" and not second.changed
    assert second.magnet == first.magnet and second.bytes_from_glance == 0
    assert {p: os.stat(p).st_mtime_ns for p in files} == before
    with open(glance_server.access_log_path, encoding="utf-8") as f:
        f.seek(access_offset)
        requests = f.read()
    assert "PATCH" not in requests and "/file" not in requests, requests
    assert node.glance.get_image(record["id"])["updated_at"] == glance_before["updated_at"]
    image = node.glance.image_info(record["id"])
    assert image.magnet_uri == first.magnet and image.is_torrentable is True
    assert len(first.magnet) <= 255


def _assert_nothing_changed(node, tracker, image_id=None):
    assert node.publisher.registry.list() == []
    assert tracker.whitelisted() == set()
    if image_id is not None:
        record = node.glance.get_image(image_id)
        assert "torrent_magnet" not in record and "is_torrentable" not in record


def test_publish_refuses_missing_non_active_and_non_raw_images(
    origin, tracker, raw_image, glance_server
):
    node = origin(tracker)
    node.conf.set_override("origin_advertise_addresses", ["127.0.0.1:6881"], "torrent_images")
    whitelist_mtime = os.stat(tracker.whitelist_path).st_mtime_ns

    missing = str(uuid.uuid4())
    with pytest.raises(exception.ImageNotFound, match=f"Image {missing} was not found"):
        node.publisher.publish(missing)
    _assert_nothing_changed(node, tracker)

    client = glance_server.client()
    queued = client.images.create(name="no-data", disk_format="raw", container_format="bare")
    try:
        with pytest.raises(exception.NotPublishable, match="it is queued, not active"):
            node.publisher.publish(queued["id"])
        _assert_nothing_changed(node, tracker, queued["id"])
    finally:
        client.images.delete(queued["id"])

    # glance 33 checks uploads against disk_format; ploop is not inspected.
    ploop = raw_image(1 * MiB, disk_format="ploop")
    with pytest.raises(exception.NotPublishable, match="disk format is ploop; only raw"):
        node.publisher.publish(ploop["id"])
    _assert_nothing_changed(node, tracker, ploop["id"])
    assert os.stat(tracker.whitelist_path).st_mtime_ns == whitelist_mtime


def test_promotion_publishes_after_ten_requests_not_nine(origin, raw_image):
    node = origin(tracker=None, promotion_enabled=True)
    node.conf.set_override("origin_advertise_addresses", ["127.0.0.1:6881"], "torrent_images")
    popular, unpopular = raw_image(2 * MiB), raw_image(2 * MiB)
    now = [1_000_000.0]
    counter = RequestCounter(node.conf.torrent_images.origin_state_dir, 600, clock=lambda: now[0])
    promoter = Promoter(node.conf, node.publisher, counter=counter)
    endpoint = ImageSendEndpoint(promoter)

    def image_send(image_id: str) -> None:
        # What glance-api sends after a complete download (payload of glance.notifier).
        payload = {
            "bytes_sent": 2 * MiB,
            "image_id": image_id,
            "owner_id": "a1b2c3",
            "receiver_tenant_id": "d4e5f6",
            "receiver_user_id": "0a1b2c",
        }
        metadata = {"message_id": str(uuid.uuid4()), "timestamp": "2026-01-01 00:00:00.0"}
        assert endpoint.info({}, "image.localhost", "image.send", payload, metadata) == "handled"
        now[0] += 20  # the 10 requests of an image span 380 s: inside the 10 minutes

    for _ in range(9):
        image_send(popular["id"])
        image_send(unpopular["id"])
    assert node.publisher.registry.list() == []
    assert "torrent_magnet" not in node.glance.get_image(popular["id"])

    image_send(popular["id"])

    assert [e.image_id for e in node.publisher.registry.list()] == [popular["id"]]
    published = node.glance.image_info(popular["id"])
    assert published.is_torrentable is True and published.magnet is not None
    assert "torrent_magnet" not in node.glance.get_image(unpopular["id"])
    # Requests of a published image are not counted any more.
    assert promoter.record_request(popular["id"]).count == 0


def test_periodic_check_unpublishes_deleted_images(origin, tracker, raw_image, glance_server):
    node = origin(tracker)
    node.conf.set_override("origin_advertise_addresses", ["127.0.0.1:6881"], "torrent_images")
    kept, deleted = raw_image(2 * MiB), raw_image(2 * MiB)
    for record in (kept, deleted):
        node.publisher.publish(record["id"])
    seeder = node.start_seeder()
    node.wait_seeding(deleted["id"])
    gone = node.publisher.registry.get(deleted["id"])
    glance_server.client().images.delete(deleted["id"])

    seeder.check()

    assert seeder.seeded() == [kept["id"]]
    assert [e.image_id for e in node.publisher.registry.list()] == [kept["id"]]
    assert not os.path.exists(gone.directory)
    assert tracker.whitelisted() == set(node.publisher.registry.get(kept["id"]).tracker_hashes)


def test_seeder_refetches_missing_data_through_the_glance_web_seed(
    origin, raw_image, glance_server
):
    node = origin(tracker=None, origin_web_seed=True)
    node.conf.set_override("origin_advertise_addresses", ["127.0.0.1:6881"], "torrent_images")
    record = raw_image(8 * MiB)
    node.publisher.publish(record["id"])
    entry = node.publisher.registry.get(record["id"])
    os.unlink(entry.data_path)  # a lost data disk
    offset = os.path.getsize(glance_server.access_log_path)

    node.start_seeder()

    deadline = time.monotonic() + 60
    while not (os.path.exists(entry.data_path) and "seed" in _modes(node.seeder)):
        assert time.monotonic() < deadline, "the seeder did not restore the data"
        time.sleep(0.2)
    assert sha512_of(entry.data_path) == record["os_hash_value"]
    assert glance_file_bytes(glance_server.access_log_path, record["id"], offset) >= 8 * MiB


def _modes(seeder: OriginSeeder) -> set[str]:
    return {s.mode for s in seeder.stats()}


def test_seed_command_stops_cleanly_on_sigterm(origin, raw_image, glance_server, tmp_path):
    node = origin(tracker=None)
    record = raw_image(2 * MiB)
    address = next_loopback_address()
    with socket.socket() as s:
        s.bind((address, 0))
        port = s.getsockname()[1]
    config = tmp_path / "origin.conf"
    config.write_text(
        "[torrent_images]\n"
        f"glance_endpoint = {glance_server.url}\n"
        "glance_noauth = true\n"
        f"origin_state_dir = {node.conf.torrent_images.origin_state_dir}\n"
        f"listen_interfaces = {address}:{port}\n"
        "origin_stats_interval = 1\n"
    )
    publish = subprocess.run(
        [sys.executable, "-m", "nova_torrent_images.cmd.main", "--config-file", str(config)]
        + ["publish", record["id"]],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert publish.returncode == 0, publish.stderr
    assert f"x.pe={address}:{port}" in publish.stdout

    proc = subprocess.Popen(
        [sys.executable, "-m", "nova_torrent_images.cmd.main", "--config-file", str(config)]
        + ["seed"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while not any("Origin seeder:" in line for line in lines):  # first stats line
            assert proc.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "".join(lines)
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=5)
    output = "".join(lines)
    assert f"Image {record['id']}: seeding" in output
    assert "Origin seeder stopped after" in output


def test_cli_errors_are_one_line_and_non_zero(glance_server, tmp_path):
    config = tmp_path / "origin.conf"
    config.write_text(
        "[torrent_images]\n"
        f"glance_endpoint = {glance_server.url}\n"
        "glance_noauth = true\n"
        f"origin_state_dir = {tmp_path / 'state'}\n"
        "origin_advertise_addresses = 127.0.0.1:6881\n"
    )
    missing = str(uuid.uuid4())
    proc = subprocess.run(
        [sys.executable, "-m", "nova_torrent_images.cmd.main", "--config-file", str(config)]
        + ["publish", missing],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("nova-torrent-images:")]
    assert errors == [f"nova-torrent-images: error: Image {missing} was not found in Glance"]
