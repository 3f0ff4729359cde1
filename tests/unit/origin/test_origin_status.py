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

"""Which origin nodes serve an image: the stripe server's status endpoint and the
``origin-status`` command that asks every advertised node."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

import pytest

from nova_torrent_images import exception
from nova_torrent_images.cmd import main as cli
from nova_torrent_images.cmd import origin as origin_cmd
from nova_torrent_images.origin.stripe_server import StripeDispenser, StripeServer
from nova_torrent_images.swarm.stripe_client import StripeClient
from nova_torrent_images.testing.swarm import make_conf
from tests.unit.origin.fakes import IMAGE_ID, FakeGlance, publish_one

SIZE = 2 * 1024 * 1024 + 17


def server(registry, *, zone=None, allowed=("127.0.0.0/8",), image_status=None):
    dispenser = StripeDispenser(registry, batch_bytes=512 * 1024, reissue_after=5.0)
    return StripeServer(
        "127.0.0.1:0",
        dispenser,
        rate_limit=0,
        allowed_cidrs=list(allowed),
        zone=zone,
        image_status=image_status,
    ).start()


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as answer:  # noqa: S310  a local test server
        assert answer.headers["Cache-Control"] == "no-store"
        return json.loads(answer.read())


@pytest.fixture
def published(tmp_path):
    return publish_one(str(tmp_path / "origin"), SIZE)


def test_status_says_what_the_node_holds_and_served(published):
    registry, entry, data = published
    srv = server(registry, zone="zone-a")
    try:
        url = f"{srv.url}/v1/torrents/{entry.info_hash_v2}/status"
        status = get_json(url)
        assert status == {
            "image_id": IMAGE_ID,
            "zone": "zone-a",
            "info_hash_v1": None,
            "info_hash_v2": entry.info_hash_v2,
            "size": SIZE,
            "complete": 1.0,
            "served": 0,
            "hosts": 0,
        }
        client = StripeClient(IMAGE_ID, (srv.url,), entry.info_hash_v2, "127.0.0.1:6881")
        batch = client.next_batch()
        assert batch is not None and batch[1]
        assert client.fetch_range(0, 0, 99) == data[:100]
        status = get_json(url)
        assert status["served"] == 100 and status["hosts"] == 1
    finally:
        srv.stop()


def test_status_of_an_entry_whose_data_is_missing(published):
    registry, entry, _ = published
    srv = server(registry, image_status=lambda e: {"mode": "web-seed download", "complete": 0.25})
    try:
        url = f"{srv.url}/v1/torrents/{entry.info_hash_v2}/status"
        assert get_json(url)["complete"] == 1.0  # whole data: 1.0, whatever the seeder says
        with open(entry.data_path, "r+b") as f:
            f.truncate(SIZE // 2)
        status = get_json(url)
        assert status["complete"] == 0.25 and status["mode"] == "web-seed download"
        assert status["served"] == 0
    finally:
        srv.stop()


def test_status_is_read_only_and_within_allowed_peer_cidrs(published):
    registry, entry, _ = published
    srv = server(registry)
    try:
        with pytest.raises(urllib.error.HTTPError) as unknown:
            urllib.request.urlopen(f"{srv.url}/v1/torrents/{'ab' * 32}/status", timeout=5)  # noqa: S310
        assert unknown.value.code == 404
        post = urllib.request.Request(
            f"{srv.url}/v1/torrents/{entry.info_hash_v2}/status", data=b"{}", method="POST"
        )
        with pytest.raises(urllib.error.HTTPError) as posted:
            urllib.request.urlopen(post, timeout=5)  # noqa: S310
        assert posted.value.code == 405
    finally:
        srv.stop()
    outside = server(registry, allowed=("10.0.0.0/8",))
    try:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(  # noqa: S310
                f"{outside.url}/v1/torrents/{entry.info_hash_v2}/status", timeout=5
            )
        assert refused.value.code == 403
    finally:
        outside.stop()


# -- the command -----------------------------------------------------------------------
def closed_port() -> int:
    """A port on 127.0.0.1 nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def two_zones(published):
    """The image as Glance shows it: one node in zone a (up), one in zone b (down), and a
    zone-neutral node (up)."""
    registry, entry, _ = published
    up_a, up_neutral = server(registry, zone="a"), server(registry)
    down = f"http://127.0.0.1:{closed_port()}"
    glance = FakeGlance()
    glance.add(IMAGE_ID, size=SIZE)
    glance.records[IMAGE_ID].update(
        torrent_magnet=entry.magnet,
        torrent_stripes=up_neutral.url,
        torrent_zone_a=f"stripes={up_a.url}",
        torrent_zone_b=f"stripes={down};trackers=http://127.0.0.1:6969/announce",
    )
    yield glance, entry, up_a, up_neutral, down
    up_a.stop()
    up_neutral.stop()


def test_origin_status_asks_every_advertised_node(two_zones):
    glance, entry, up_a, up_neutral, down = two_zones
    report = origin_cmd.origin_status(make_conf(), IMAGE_ID, glance=glance, timeout=2)
    assert report["info_hash"] == entry.info_hash_v2
    nodes = {(n["zone"], n["url"]): n for n in report["nodes"]}
    assert list(nodes) == [(None, up_neutral.url), ("a", up_a.url), ("b", down)]
    neutral, a, b = nodes.values()
    assert neutral["reachable"] and neutral["error"] is None and neutral["complete"] == 1.0
    assert a["reachable"] and a["node_zone"] == "a" and a["size"] == SIZE
    assert not b["reachable"] and "refused" in b["error"].lower()
    assert report["unusable_properties"] == {}


def test_origin_status_command_table_json_and_exit_status(two_zones, tmp_path, capsys, monkeypatch):
    glance, entry, up_a, up_neutral, down = two_zones
    monkeypatch.setattr(
        "nova_torrent_images.glance.client.GlanceClient.from_conf", lambda conf: glance
    )
    conf_file = tmp_path / "nti.conf"
    conf_file.write_text("[torrent_images]\n")
    args = ["--config-file", str(conf_file), "origin-status", IMAGE_ID, "--timeout", "2"]
    assert cli.main(args) == 1  # zone b's node did not answer
    out = capsys.readouterr().out
    assert "3 origin nodes" in out
    line_a = next(line for line in out.splitlines() if up_a.url in line)
    assert line_a.split()[0] == "a" and "100.0%" in line_a and line_a.endswith("ok")
    line_b = next(line for line in out.splitlines() if down in line)
    assert "unreachable" in line_b

    assert cli.main([*args, "--format", "json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert [n["reachable"] for n in report["nodes"]] == [True, True, False]

    # Every node answers: exit status 0.
    glance.records[IMAGE_ID].pop("torrent_zone_b")
    assert cli.main([*args, "--format", "json"]) == 0
    assert all(n["reachable"] for n in json.loads(capsys.readouterr().out)["nodes"])


def test_origin_status_of_an_image_without_nodes_or_torrent(tmp_path, capsys, monkeypatch):
    glance = FakeGlance()
    glance.add(IMAGE_ID)
    monkeypatch.setattr(
        "nova_torrent_images.glance.client.GlanceClient.from_conf", lambda conf: glance
    )
    conf_file = tmp_path / "nti.conf"
    conf_file.write_text("[torrent_images]\n")
    args = ["--config-file", str(conf_file), "origin-status", IMAGE_ID]
    assert cli.main(args) == 1
    assert "not published" in capsys.readouterr().err
    glance.records[IMAGE_ID]["torrent_magnet"] = "magnet:?xt=urn:btmh:1220" + "ab" * 32
    glance.records[IMAGE_ID]["torrent_zone_x"] = "stripes=http://cache.example:80"
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert IMAGE_ID in err and "no origin node" in err and "torrent_zone_x" in err
    report = origin_cmd.origin_status(make_conf(), IMAGE_ID, glance=glance)
    assert report["nodes"] == [] and "torrent_zone_x" in report["unusable_properties"]
    del glance.records[IMAGE_ID]["torrent_magnet"]
    with pytest.raises(exception.OriginStatusError, match=IMAGE_ID):
        origin_cmd.origin_status(make_conf(), IMAGE_ID, glance=glance)


def test_the_seeders_stripe_server_answers_its_zone_and_seeding(tmp_path):
    from nova_torrent_images.origin.publisher import Publisher
    from nova_torrent_images.origin.seeder import OriginSeeder
    from nova_torrent_images.testing.swarm import next_loopback_address

    conf = make_conf(
        origin_state_dir=str(tmp_path / "origin"),
        origin_advertise_addresses=["127.0.0.1:6881"],
        origin_stripe_listen="127.0.0.1:0",
        origin_zone="zone-a",
        allowed_peer_cidrs=["127.0.0.0/8"],
        listen_interfaces=[f"{next_loopback_address()}:0"],
    )
    glance = FakeGlance()
    glance.add(IMAGE_ID, size=SIZE)
    publisher = Publisher(conf, glance)
    entry_hash = publisher.publish(IMAGE_ID).info_hash_v2
    seeder = OriginSeeder(conf, publisher=publisher).start()
    try:
        status = get_json(f"{seeder.stripes.url}/v1/torrents/{entry_hash}/status")
        assert status["zone"] == "zone-a" and status["complete"] == 1.0
        assert status["mode"] == "seed" and status["uploaded"] == 0 and status["peers"] == 0
    finally:
        seeder.stop()
