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

"""Two origin nodes, one real glance-api: they publish the same torrent, the second
changes nothing in Glance, and ``origin-status`` sees both."""

from __future__ import annotations

import os

import pytest

from nova_torrent_images.cmd.origin import origin_status
from nova_torrent_images.glance.client import GlanceClient
from nova_torrent_images.origin.publisher import Publisher
from nova_torrent_images.origin.stripe_server import StripeDispenser, StripeServer
from nova_torrent_images.testing.swarm import make_conf

MiB = 1024 * 1024


@pytest.fixture
def image(glance_server, tmp_path):
    path = str(tmp_path / "image.raw")
    with open(path, "wb") as f:
        f.write(os.urandom(3 * MiB + 123))
    record = glance_server.create_image(path, name="two-nodes")
    yield record
    glance_server.client().images.delete(record["id"])


def node(glance_server, tmp_path, name: str, stripes: list[str]) -> Publisher:
    conf = make_conf(
        glance_endpoint=glance_server.url,
        glance_noauth=True,
        origin_state_dir=str(tmp_path / name),
        origin_advertise_addresses=["127.0.0.2:6881", "127.0.0.3:6881"],
        origin_stripe_advertise=stripes,
        allowed_peer_cidrs=["127.0.0.0/8"],
    )
    return Publisher(conf, GlanceClient.for_endpoint(glance_server.url, conf))


def test_two_nodes_publish_one_torrent_and_origin_status_sees_both(glance_server, image, tmp_path):
    servers: list[StripeServer] = []
    try:
        # Both stripe servers first: their URLs are what both nodes advertise.
        nodes = [node(glance_server, tmp_path, name, []) for name in ("a", "b")]
        for publisher in nodes:
            servers.append(
                StripeServer(
                    "127.0.0.1:0",
                    StripeDispenser(publisher.registry, batch_bytes=MiB, reissue_after=5.0),
                    rate_limit=0,
                    allowed_cidrs=["127.0.0.0/8"],
                ).start()
            )
        urls = [s.url for s in servers]
        for publisher in nodes:
            publisher.conf.set_override("origin_stripe_advertise", urls, "torrent_images")

        first = nodes[0].publish(image["id"])
        record = nodes[0].glance.get_image(image["id"])
        second = nodes[1].publish(image["id"])
        after = nodes[1].glance.get_image(image["id"])

        assert first.status == "published" and second.bytes_from_glance == image["size"]
        assert (second.magnet, second.info_hash_v2) == (first.magnet, first.info_hash_v2)
        a, b = (p.registry.get(image["id"]) for p in nodes)
        assert nodes[0].registry.read_torrent(a) == nodes[1].registry.read_torrent(b)
        # Glance changed nothing for the second node: no property, not even updated_at.
        assert after == record
        assert after["torrent_stripes"] == ",".join(urls)
        assert nodes[0].publish(image["id"]).status == "unchanged"
        assert nodes[1].publish(image["id"]).status == "unchanged"

        report = origin_status(nodes[0].conf, image["id"], glance=nodes[0].glance, timeout=5)
        assert [(n["url"], n["reachable"], n["complete"]) for n in report["nodes"]] == [
            (url, True, 1.0) for url in urls
        ]
        assert report["info_hash"] == first.info_hash_v2
    finally:
        for server in servers:
            server.stop()
