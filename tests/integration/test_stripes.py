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

"""Origin stripes end to end: one copy per piece, a host that dies, a standard client."""

from __future__ import annotations

import hashlib
import os
import threading

import pytest

from nova_torrent_images.compute.pipeline import fetch_to_file
from nova_torrent_images.glance.client import GlanceClient
from nova_torrent_images.swarm.stripe_client import StripeClient
from nova_torrent_images.testing.http_origin import HTTPOrigin
from nova_torrent_images.testing.origin_node import start_origin_node
from nova_torrent_images.testing.swarm import SimulatedHost

MiB = 1024 * 1024
CAP = 16 * MiB


@pytest.fixture
def published(tmp_path):
    """An image in a capped Glance-like origin, published with stripes by an origin node."""
    path = tmp_path / "image.raw"
    path.write_bytes(os.urandom(32 * MiB))
    with HTTPOrigin(str(tmp_path / "glance"), upload_rate=CAP) as glance_origin:
        record = glance_origin.create_image(str(path))
        node = start_origin_node(
            glance_origin.url, str(tmp_path / "origin"), upload_kib=CAP // 1024
        )
        try:
            node.publish(record["id"])
            glance = GlanceClient.for_endpoint(glance_origin.url)
            yield glance, glance.image_info(record["id"]), node, glance_origin
        finally:
            node.stop()


def fetch_on(hosts, image, glance, tmp_path):
    results, errors = [None] * len(hosts), []

    def one(i):
        try:
            results[i] = fetch_to_file(
                image,
                str(tmp_path / f"host-{i}.raw"),
                conf=hosts[i].conf,
                glance=glance,
                engine=hosts[i].engine,
            )
        except Exception as exc:  # noqa: BLE001  reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(hosts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


def sha512_of(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha512").hexdigest()


def test_a_fleet_takes_one_copy_from_the_origin(published, tmp_path):
    glance, image, node, glance_origin = published
    assert image.properties["torrent_stripes"] == node.seeder.stripes.url
    hosts = [SimulatedHost(f"compute-{i}", download_rate_limit=CAP // 1024) for i in range(4)]
    try:
        before, served = node.seeder.uploaded_bytes(), glance_origin.bytes_served
        results = fetch_on(hosts, image, glance, tmp_path)
        egress = node.seeder.uploaded_bytes() - before + glance_origin.bytes_served - served
    finally:
        for host in hosts:
            host.stop()
    for i, result in enumerate(results):
        assert result.source == "torrent"
        assert result.swarm.bytes_from_stripes > 0  # each host took a share from the origin
        # Stripe pieces are the origin's, not a peer's (libtorrent reports them from 0.0.0.0).
        assert not any(peer.startswith("0.0.0.0:") for peer in result.swarm.per_peer)
        assert result.bytes_from_peers + result.swarm.bytes_from_stripes <= image.size * 1.25
        assert sha512_of(str(tmp_path / f"host-{i}.raw")) == image.hash_value
    # One copy, plus what the dispenser handed out again to a host whose swarm went quiet
    # (a CPU-starved test machine makes that happen); plain BitTorrent without stripes
    # sends several copies here.
    assert egress <= 1.25 * image.size, f"origin sent {egress / image.size:.2f} copies"


def test_pieces_a_dead_host_took_are_handed_out_again(published, tmp_path):
    glance, image, node, _ = published
    # A host takes two batches and dies before any other host sees a byte of them.
    dead = StripeClient(image.id, (node.seeder.stripes.url,), image.magnet.best_hash, "")
    taken = dead.next_batch()[1] + dead.next_batch()[1]
    assert taken
    node.seeder.stripes.dispenser.reissue_after = 0.5
    hosts = [SimulatedHost(f"compute-{i}", stall_timeout=30) for i in range(2)]
    try:
        results = fetch_on(hosts, image, glance, tmp_path)
    finally:
        for host in hosts:
            host.stop()
    for i, result in enumerate(results):
        assert result.source == "torrent"
        assert sha512_of(str(tmp_path / f"host-{i}.raw")) == image.hash_value


def test_a_client_without_stripes_still_gets_the_image_by_bittorrent(published, tmp_path):
    glance, image, node, _ = published
    host = SimulatedHost("standard-client", use_origin_stripes=False)
    try:
        (result,) = fetch_on([host], image, glance, tmp_path)
    finally:
        host.stop()
    assert result.source == "torrent" and result.swarm.bytes_from_stripes == 0
    assert result.bytes_from_origin == image.size  # over the origin's BitTorrent port
    assert sha512_of(str(tmp_path / "host-0.raw")) == image.hash_value
