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

"""Three zones share one Glance: each zone's bytes stay inside it.

As an operator runs it, with the command line only: one real glance-api; per zone a
127.0.1Z.0/24 range, its own Debian opentracker, its own origin node (``nova-torrent-images
seed`` with ``origin_zone``) and 4 compute hosts (``[torrent_images] zone``) each running
``nova-torrent-images fetch IMAGE --output F --format json`` at once. What crossed zones is
counted from each host's own figures: bytes per peer and per origin stripe server.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import time
import urllib.parse

import libtorrent as lt
import pytest

from nova_torrent_images.glance.client import GlanceClient
from nova_torrent_images.glance.magnet import parse_magnet
from nova_torrent_images.testing.opentracker import Opentracker, find_binary
from tests.integration.conftest import require_program
from tests.integration.test_origin_loss import (
    OriginNodeProcess,
    Process,
    cli,
    free_port,
    glance_file_bytes,
    random_image,
    sha512_of,
)

MiB = 1024 * 1024
SIZE = 16 * MiB
CAP_KIB = 4 * 1024  # every host's downlink and every origin's uplink, KiB/s
ZONES = ("zone-a", "zone-b", "zone-c")
HOSTS_PER_ZONE = 4


def zone_network(index: int) -> ipaddress.IPv4Network:
    return ipaddress.ip_network(f"127.0.{110 + index}.0/24")


def zone_address(index: int, host: int) -> str:
    return str(zone_network(index)[host])


def zone_origin(glance_server, tracker: Opentracker, index: int, tmp_path) -> OriginNodeProcess:
    """An origin node of one zone: its own address, stripes and tracker."""
    zone = ZONES[index]
    return OriginNodeProcess(
        glance_server,
        tracker,
        str(tmp_path / f"origin-{zone}"),
        tmp_path,
        f"origin-{zone}",
        address=zone_address(index, 2),
        extra=f"origin_zone = {zone}\n",
    )


def host_config(tmp_path, glance_server, index: int, host: int) -> tuple[str, str]:
    address = zone_address(index, 10 + host)
    name = f"{ZONES[index]}-host-{host}"
    state = tmp_path / name
    state.mkdir()
    config = tmp_path / f"{name}.conf"
    config.write_text(
        "[torrent_images]\n"
        f"glance_endpoint = {glance_server.url}\n"
        "glance_noauth = true\n"
        f"zone = {ZONES[index]}\n"
        f"state_dir = {state}\n"
        f"listen_interfaces = {address}:{free_port(address)}\n"
        f"download_rate_limit = {CAP_KIB}\n"
        "stall_timeout = 20\n"
        "min_announce_interval = 1\n"
    )
    return str(config), str(state)


def zone_of(address: str) -> int | None:
    ip = ipaddress.ip_address(address)
    for index in range(len(ZONES)):
        if ip in zone_network(index):
            return index
    return None


def crossed_bytes(index: int, answer: dict) -> tuple[int, int]:
    """(bytes from other zones, bytes in all) of one host's fetch, from its own figures."""
    swarm = answer.get("swarm") or {}
    crossed = total = 0
    for endpoint, n in (swarm.get("per_peer") or {}).items():
        host = endpoint.rpartition(":")[0].strip("[]")
        total += n
        crossed += n if zone_of(host) != index else 0
    for url, n in (swarm.get("per_stripe_server") or {}).items():
        total += n
        crossed += n if zone_of(urllib.parse.urlsplit(url).hostname) != index else 0
    return crossed, total


@pytest.fixture
def zone_trackers(tmp_path):
    require_program(find_binary(), "opentracker", "opentracker", "tracker")
    trackers = [
        Opentracker(workdir=tmp_path / f"tracker-{z}", host=zone_address(i, 1)).start()
        for i, z in enumerate(ZONES)
    ]
    yield trackers
    for t in trackers:
        t.stop()


@pytest.fixture
def image(glance_server, tmp_path):
    return random_image(glance_server, tmp_path, SIZE)


def boot_storm(glance_server, zone_trackers, image, tmp_path, *, dead_zone: int | None = None):
    """Publish on every zone's origin, start them (killing ``dead_zone``'s), start all
    12 hosts at once; returns the hosts' answers and the bytes Glance sent in all."""
    log = str(glance_server.access_log_path)
    offset = os.path.getsize(log)
    origins = [zone_origin(glance_server, t, i, tmp_path) for i, t in enumerate(zone_trackers)]
    for node in origins:
        node.publish(image["id"])
    fleet = []
    try:
        for node in origins:
            node.start()
        if dead_zone is not None:
            origins[dead_zone].kill()
        for index in range(len(ZONES)):
            for host in range(HOSTS_PER_ZONE):
                config, state = host_config(tmp_path, glance_server, index, host)
                output = str(tmp_path / f"out-{index}-{host}.raw")
                argv = cli(config, "fetch", image["id"], "--output", output, "--quiet")
                fleet.append((index, Process([*argv, "--format", "json"]), output, state))
        for _, process, _, _ in fleet:
            assert process.wait(timeout=240) == 0, process.output
    finally:
        for _, process, _, _ in fleet:
            process.kill()
        for node in origins:
            node.kill()
    answers = []
    for index, process, output, state in fleet:
        assert sha512_of(output) == image["os_hash_value"], process.output
        scratch = os.path.join(state, "scratch")
        assert not os.path.exists(scratch) or os.listdir(scratch) == []
        text = process.output
        answer, _ = json.JSONDecoder().raw_decode(text, text.rindex('{\n "image_id"'))
        answers.append((index, answer, text))
    glance_bytes, _ = glance_file_bytes(log, image["id"], offset)
    return answers, glance_bytes


def crossed_per_zone(answers) -> list[int]:
    crossed = [0] * len(ZONES)
    for index, answer, _ in answers:
        crossed[index] += crossed_bytes(index, answer)[0]
    return crossed


def test_three_zones_each_take_their_bytes_inside_the_zone(
    glance_server, zone_trackers, image, tmp_path
):
    answers, glance_bytes = boot_storm(glance_server, zone_trackers, image, tmp_path)
    crossed = crossed_per_zone(answers)
    print(
        f"\n3 zones x {HOSTS_PER_ZONE} hosts: crossed zones "
        f"{[round(c / SIZE, 2) for c in crossed]} images per zone; Glance served "
        f"{glance_bytes / SIZE:.2f} images (the 3 origins' publishes)"
    )
    for index, answer, output in answers:
        assert answer["source"] == "torrent", output
        assert answer["swarm"]["stripes_zone"] == ZONES[index], output
        # Every byte is accounted for, from the zone's origin and its other hosts.
        assert crossed_bytes(index, answer)[1] >= SIZE, output
    # The hosts traded among themselves: the origins sent about one copy per zone.
    from_peers = sum(answer["bytes_from_peers"] for _, answer, _ in answers)
    assert from_peers >= SIZE * len(ZONES) * (HOSTS_PER_ZONE - 2)
    # Each zone's origin read the image from Glance once; no host read any of it there.
    assert glance_bytes <= 1.1 * SIZE * len(ZONES)
    assert sum(crossed) <= 1.1 * SIZE * (len(ZONES) - 1)
    assert max(crossed) <= 0.1 * SIZE


def test_a_zone_whose_origin_is_dead_takes_one_copy_from_another_zone(
    glance_server, zone_trackers, image, tmp_path
):
    dead = 2
    answers, glance_bytes = boot_storm(
        glance_server, zone_trackers, image, tmp_path, dead_zone=dead
    )
    crossed = crossed_per_zone(answers)
    print(
        f"\n{ZONES[dead]}'s origin dead: crossed zones "
        f"{[round(c / SIZE, 2) for c in crossed]} images per zone "
        f"({crossed[dead] / MiB:.1f} MiB into {ZONES[dead]}); Glance served "
        f"{glance_bytes / SIZE:.2f} images"
    )
    for index, answer, output in answers:
        assert answer["source"] == "torrent", output
        if index == dead:
            # Its stripes came from another zone's node, in one copy for the zone.
            assert answer["swarm"]["stripes_zone"] not in ("", ZONES[dead]), output
            assert "cross_zone_fallback" in output
    assert glance_bytes <= 1.1 * SIZE * len(ZONES)
    assert crossed[dead] <= 1.1 * SIZE
    assert sum(crossed) <= 1.1 * SIZE * (len(ZONES) - 1)


def test_a_plain_bittorrent_client_finds_the_swarm_from_the_magnet_alone(
    glance_server, zone_trackers, image, tmp_path
):
    """Zones or not, torrent_magnet is a magnet any client can use: it names every zone's
    tracker (as many as fit), not only the info-hash."""
    origins = [zone_origin(glance_server, t, i, tmp_path) for i, t in enumerate(zone_trackers)]
    for node in origins:
        node.publish(image["id"])
    record = GlanceClient.for_endpoint(glance_server.url).get_image(image["id"])
    magnet = record["torrent_magnet"]
    assert set(parse_magnet(magnet).trackers) == {t.announce_url for t in zone_trackers}, magnet
    address = "127.0.120.5"  # in no zone
    session = lt.session(
        {
            "listen_interfaces": f"{address}:{free_port(address)}",
            "outgoing_interfaces": address,
            "enable_dht": False,
            "enable_lsd": False,
            "enable_upnp": False,
            "enable_natpmp": False,
            "enable_outgoing_utp": False,
            "enable_incoming_utp": False,
        }
    )
    try:
        for node in origins:
            node.start()
        params = lt.parse_magnet_uri(magnet)
        params.save_path = str(tmp_path / "client")
        handle = session.add_torrent(params)
        deadline = time.monotonic() + 120
        while not handle.status().is_seeding:
            assert time.monotonic() < deadline, f"no swarm found from {magnet}"
            time.sleep(0.2)
        name = handle.status().name
    finally:
        session.pause()
        for node in origins:
            node.kill()
    with open(tmp_path / "client" / name, "rb") as f:
        assert hashlib.file_digest(f, "sha512").hexdigest() == image["os_hash_value"]
