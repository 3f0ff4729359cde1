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

"""A zone cache: a stock nginx in front of the origin's HTTP endpoints.

The origin's torrent and data answers are content-addressed (ETag = info-hash,
``Cache-Control: public, max-age=31536000, immutable``), so an unmodified caching proxy
(Debian's nginx with ``proxy_cache`` and the ``slice`` module, see
:mod:`nova_torrent_images.testing.nginx`) serves a zone's second host from its cache:
the origin sends each byte once per zone, whatever ranges the hosts ask for.
"""

from __future__ import annotations

import hashlib
import os
import random
import threading

import pytest

from nova_torrent_images.glance.client import GlanceClient
from nova_torrent_images.swarm.stripe_client import StripeClient
from nova_torrent_images.swarm.torrent import describe
from nova_torrent_images.testing.http_origin import HTTPOrigin
from nova_torrent_images.testing.nginx import Nginx, find_binary
from nova_torrent_images.testing.origin_node import start_origin_node
from nova_torrent_images.testing.swarm import SimulatedHost
from tests.integration.conftest import require_program

from .test_stripes import fetch_on, sha512_of

MiB = 1024 * 1024
SIZE = 24 * MiB + 12345  # the last piece and the last 1 MiB slice are short


@pytest.fixture
def zone(tmp_path):
    """(glance, image, origin node, nginx in front of the node's stripe server)."""
    require_program(find_binary(), "nginx", "nginx", "zone cache")
    path = tmp_path / "image.raw"
    path.write_bytes(os.urandom(SIZE))
    with HTTPOrigin(str(tmp_path / "glance")) as glance_origin:
        record = glance_origin.create_image(str(path))
        node = start_origin_node(glance_origin.url, str(tmp_path / "origin"), upload_kib=0)
        try:
            # nginx's workers run as nobody: its directory must not be under pytest's
            # private tmp_path, so it makes its own (and removes it).
            with Nginx(node.seeder.stripes.url) as proxy:
                # What an operator does: publish the proxy's URL as the stripe endpoint.
                node.conf.set_override(
                    "origin_stripe_advertise", [proxy.url], group="torrent_images"
                )
                # And raise the bounds per address: the hosts behind it share its address.
                node.seeder.stripes.dispenser.held_bytes = 1024 * MiB
                node.publish(record["id"])
                glance = GlanceClient.for_endpoint(glance_origin.url)
                yield glance, glance.image_info(record["id"]), node, proxy
        finally:
            node.stop()


def fetch_everything(client: StripeClient, size: int, pieces_per_request: int) -> bytes:
    """The torrent, then every piece in runs of ``pieces_per_request``, in random order."""
    meta = describe(client.fetch_torrent())
    step = meta.piece_length * pieces_per_request
    starts = list(range(0, size, step))
    random.shuffle(starts)
    chunks = {s: client.fetch_range(0, s, min(s + step, size) - 1) for s in starts}
    return b"".join(chunks[s] for s in sorted(chunks))


def test_a_zones_second_host_is_served_from_the_cache(zone):
    _, image, node, proxy = zone
    assert image.properties["torrent_stripes"] == proxy.url
    server = node.seeder.stripes
    info_hash = image.magnet.best_hash
    host_a = StripeClient(image.id, (proxy.url,), info_hash, "127.0.0.1:6881")
    data_a = fetch_everything(host_a, image.size, pieces_per_request=1)
    after_a = server.bytes_served
    assert after_a == image.size  # every slice once, none past the end
    lines_before_b = len(proxy.cache_statuses())

    # Host B asks for other ranges (runs of three pieces): the slices are shared anyway.
    host_b = StripeClient(image.id, (proxy.url,), info_hash, "127.0.0.2:6881")
    data_b = fetch_everything(host_b, image.size, pieces_per_request=3)
    assert server.bytes_served == after_a, "the origin sent bytes for host B"
    for data in (data_a, data_b):
        assert hashlib.sha512(data).hexdigest() == image.hash_value
    statuses = proxy.cache_statuses()[lines_before_b:]
    assert statuses and all(status == "HIT" for _, status in statuses), statuses


def test_hosts_asking_at_once_take_one_copy_from_the_origin(zone):
    _, image, node, proxy = zone
    info_hash = image.magnet.best_hash
    results, errors = {}, []

    def host(i):
        try:
            client = StripeClient(image.id, (proxy.url,), info_hash, f"127.0.0.{i + 1}:6881")
            results[i] = fetch_everything(client, image.size, pieces_per_request=1 + i % 2)
        except Exception as exc:  # noqa: BLE001  reported below
            errors.append(exc)

    threads = [threading.Thread(target=host, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert all(hashlib.sha512(d).hexdigest() == image.hash_value for d in results.values())
    # proxy_cache_lock: a slice several hosts ask for at once leaves the origin once.
    assert node.seeder.stripes.bytes_served == image.size


def test_stripe_requests_pass_through_uncached(zone):
    _, image, node, proxy = zone
    info_hash = image.magnet.best_hash
    a = StripeClient(image.id, (proxy.url,), info_hash, "127.0.0.11:6881")
    b = StripeClient(image.id, (proxy.url,), info_hash, "127.0.0.12:6881")
    introduced: list = []
    b.on_peers = introduced.extend
    first, second = a.next_batch(), b.next_batch()
    assert first and second and not set(first[1]) & set(second[1])  # the dispenser's answers
    # The stripe server sees the proxy's address: a host may name only itself, so hosts
    # behind the proxy are served but not introduced (the tracker and PEX do that).
    assert ("127.0.0.11", 6881) not in introduced
    assert not any(
        status == "HIT" for request, status in proxy.cache_statuses() if "POST" in request
    )


def test_the_pipeline_fetches_through_the_zone_cache(zone, tmp_path):
    glance, image, node, proxy = zone
    hosts = [SimulatedHost(f"zone-{i}") for i in range(2)]
    try:
        results = fetch_on(hosts, image, glance, tmp_path)
    finally:
        for host in hosts:
            host.stop()
    for i, result in enumerate(results):
        assert result.source == "torrent"
        assert sha512_of(str(tmp_path / f"host-{i}.raw")) == image.hash_value
    assert sum(r.swarm.bytes_from_stripes for r in results) > 0
    assert node.seeder.stripes.bytes_served <= image.size
