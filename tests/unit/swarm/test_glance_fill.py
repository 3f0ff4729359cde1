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

"""Glance fills in the pieces nobody has, split between hosts that do not talk about it."""

from __future__ import annotations

import os
import threading
import time

import pytest

from nova_torrent_images import exception
from nova_torrent_images.swarm import glance_fill
from nova_torrent_images.swarm.glance_fill import GlanceFill

PIECE = 16 * 1024
PIECES = 96
DATA = os.urandom(PIECE * PIECES - 100)  # a short last piece


class Swarm:
    """Hosts that hold pieces and pass each new one to the others (instantly)."""

    def __init__(self, hosts: list[str], held: set[int]) -> None:
        self.lock = threading.Lock()
        self.have = {h: set(held) for h in hosts}
        self.alive = set(hosts)
        self.reads: list[tuple[str, int, int]] = []

    def reader(self, host: str):
        def read(start: int, end: int) -> bytes:
            with self.lock:
                self.reads.append((host, start, end))
            time.sleep(0.002)  # a request takes a little while: others pick meanwhile
            return DATA[start : end + 1]

        return read

    def fill(self, host: str) -> GlanceFill:
        def add(piece: int, data: bytes) -> None:
            assert data == DATA[piece * PIECE : (piece + 1) * PIECE]
            with self.lock:
                for h in self.alive:  # the swarm spreads it
                    self.have[h].add(piece)

        def missing() -> list[int]:
            with self.lock:
                return [p for p in range(PIECES) if p not in self.have[host]]

        def availability() -> list[int]:
            with self.lock:
                peers = [h for h in self.alive if h != host]
                return [sum(p in self.have[h] for h in peers) for p in range(PIECES)]

        def hosts() -> tuple[str, list[str]]:
            with self.lock:
                return host, sorted(h for h in self.alive if h != host)

        return GlanceFill(
            "img-1",
            self.reader(host),
            piece_length=PIECE,
            size=len(DATA),
            add_piece=add,
            missing=missing,
            availability=availability,
            hosts=hosts,
        )

    def glance_bytes(self) -> int:
        return sum(end - start + 1 for _, start, end in self.reads)


def wait_done(fills, swarm, hosts, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(len(swarm.have[h]) == PIECES for h in hosts):
            return
        time.sleep(0.01)
    raise AssertionError({h: PIECES - len(swarm.have[h]) for h in hosts})


def test_hosts_take_different_missing_pieces_so_glance_sends_them_about_once():
    hosts = [f"127.0.1.{i}" for i in range(1, 7)]
    swarm = Swarm(hosts, held=set(range(0, PIECES, 2)))  # the fleet holds half
    fills = [swarm.fill(h).start() for h in hosts]
    try:
        wait_done(fills, swarm, hosts)
    finally:
        for f in fills:
            f.stop()
    missing_bytes = sum(min(PIECE, len(DATA) - p * PIECE) for p in range(1, PIECES, 2))
    # Every missing piece once, and only missing pieces: the split by rank is disjoint.
    assert swarm.glance_bytes() == missing_bytes
    fetched = [p for _, start, end in swarm.reads for p in range(start // PIECE, end // PIECE + 1)]
    assert sorted(fetched) == list(range(1, PIECES, 2))
    assert len({h for h, _, _ in swarm.reads}) == len(hosts)  # everyone took a share


def test_a_host_whose_peers_vanish_fetches_the_rest_alone():
    hosts = ["127.0.1.1", "127.0.1.2", "127.0.1.3"]
    swarm = Swarm(hosts, held=set(range(PIECES // 2)))
    with swarm.lock:  # two hosts die before they fetch anything
        swarm.alive = {"127.0.1.1"}
    fill = swarm.fill("127.0.1.1").start()
    try:
        wait_done([fill], swarm, ["127.0.1.1"])
    finally:
        fill.stop()
    assert {h for h, _, _ in swarm.reads} == {"127.0.1.1"}
    assert fill.bytes_fetched == len(DATA) - (PIECES // 2) * PIECE


def test_pieces_a_peer_has_are_left_to_the_swarm():
    hosts = ["127.0.1.1", "127.0.1.2"]
    swarm = Swarm(hosts, held=set())
    swarm.have["127.0.1.2"] = set(range(PIECES))  # a peer has everything
    fill = swarm.fill("127.0.1.1").start()
    time.sleep(0.3)
    fill.stop()
    assert swarm.reads == []  # nothing is on no peer: Glance is not asked
    # With everything (a stall), any missing piece is fetched, rank first.
    fill = swarm.fill("127.0.1.1").start(everything=True)
    try:
        wait_done([fill], swarm, ["127.0.1.1"])
    finally:
        fill.stop()
    assert swarm.glance_bytes() == len(DATA)


def test_requests_take_runs_of_whole_pieces_up_to_the_request_size(monkeypatch):
    monkeypatch.setattr(glance_fill, "REQUEST_BYTES", 4 * PIECE)
    swarm = Swarm(["127.0.1.1"], held=set())
    fill = swarm.fill("127.0.1.1").start()
    try:
        wait_done([fill], swarm, ["127.0.1.1"])
    finally:
        fill.stop()
    assert all((end + 1 - start) <= 4 * PIECE for _, start, end in swarm.reads)
    assert all(start % PIECE == 0 for _, start, _ in swarm.reads)
    assert swarm.glance_bytes() == len(DATA)


def test_glance_failing_stops_the_fill_with_the_typed_error(monkeypatch):
    monkeypatch.setattr(glance_fill, "RETRY_DELAY", 0.01)
    swarm = Swarm(["127.0.1.1"], held=set())
    fill = swarm.fill("127.0.1.1")
    calls = []

    def down(start: int, end: int) -> bytes:
        calls.append(start)
        raise exception.GlanceUnavailable(
            image_id="img-1", operation="download", attempts=1, reason="down", option="x"
        )

    fill._read_range = down
    fill.start()
    deadline = time.monotonic() + 5
    while fill.running and time.monotonic() < deadline:
        time.sleep(0.01)
    fill.stop()
    assert isinstance(fill.failed, exception.GlanceUnavailable)
    assert len(calls) >= glance_fill.MAX_FAILURES
    assert swarm.have["127.0.1.1"] == set()


@pytest.mark.parametrize("piece", [0, 17, 95])
def test_rank_is_the_same_on_every_host_and_differs_between_hosts(piece):
    a, b = glance_fill.rank("127.0.0.2", piece), glance_fill.rank("127.0.0.3", piece)
    assert a == glance_fill.rank("127.0.0.2", piece) and a != b
