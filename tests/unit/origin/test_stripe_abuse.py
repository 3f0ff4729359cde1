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

"""The stripe endpoint under abuse: what one client can hold, and for how long.

A flood of batch requests, a client that takes batches and never asks for their data,
one that asks and never reads, a slowloris, many connections from one address: each is
bounded, and a well-behaved host beside it is still served.
"""

from __future__ import annotations

import json
import socket
import time

import pytest

from nova_torrent_images import exception
from nova_torrent_images.origin.dispenser import STRIKE_PERIODS, StripeDispenser
from nova_torrent_images.origin.stripe_guard import ConnectionLimits
from nova_torrent_images.origin.stripe_server import StripeServer
from nova_torrent_images.swarm.stripe_client import StripeClient
from tests.unit.origin.fakes import IMAGE_ID, Clock, publish_one

MiB = 1024 * 1024
SIZE = 32 * MiB  # 128 pieces of 256 KiB: large enough to fill a small receive window
PIECE = 256 * 1024
FLOODER, HOST = "127.0.0.66", "127.0.0.7"


@pytest.fixture
def published(tmp_path):
    return publish_one(str(tmp_path / "origin"), SIZE)


def dispenser(registry, clock=None, **kwargs):
    kwargs.setdefault("batch_bytes", MiB)
    kwargs.setdefault("reissue_after", 5.0)
    return StripeDispenser(registry, clock=clock or Clock(), **kwargs)


def claim(d, stripes, address, pieces):
    """What a host does with a batch: it asks for the data of each piece."""
    for p in pieces:
        d.reading_started(stripes, address, p * PIECE, (p + 1) * PIECE - 1)
        d.reading_ended(stripes, address, p * PIECE, (p + 1) * PIECE - 1, sent=True)


# -- the dispenser: what an address may hold unclaimed ------------------------------------


def test_a_flood_of_batch_requests_holds_an_eighth_of_the_image_at_most(published):
    registry, entry, _ = published
    d = dispenser(registry)
    stripes = d.image(entry.info_hash_v2)
    flooded = []
    for _ in range(100):
        flooded += d.assign(stripes, part=0, parts=1, batches=16, address=FLOODER)[0]
    assert len(flooded) == stripes.num_pieces // 8  # 4 MiB of 32 MiB
    # A host beside it still gets batches, and claims them, for as long as it likes.
    pieces, done = d.assign(stripes, part=0, parts=1, address=HOST)
    assert pieces and not done and not set(pieces) & set(flooded)


def test_the_held_limit_is_an_operator_setting_too(published):
    registry, entry, _ = published
    d = dispenser(registry, held_bytes=MiB)
    stripes = d.image(entry.info_hash_v2)
    taken = []
    for _ in range(10):
        taken += d.assign(stripes, part=0, parts=1, batches=16, address=FLOODER)[0]
    assert len(taken) == 4  # 1 MiB of 256 KiB pieces
    claim(d, stripes, FLOODER, taken)  # once asked for, the room is back
    assert len(d.assign(stripes, part=0, parts=1, address=FLOODER)[0]) == 4


def test_pieces_never_asked_for_go_back_and_their_taker_is_struck(published):
    registry, entry, _ = published
    clock = Clock()
    d = dispenser(registry, clock=clock)
    stripes = d.image(entry.info_hash_v2)
    flooded = d.assign(stripes, part=0, parts=1, address=FLOODER)[0]
    clock.now += 6  # origin_stripe_reissue_after: nothing asked for
    host_got = []
    while True:
        pieces, done = d.assign(stripes, part=0, parts=1, address=HOST)
        claim(d, stripes, HOST, pieces)
        host_got += pieces
        if done:
            break
    assert set(flooded) <= set(host_got) and sorted(host_got) == list(range(128))
    # The flooder gets nothing, not even re-issues, for ten periods; then it may ask again.
    assert d.assign(stripes, part=0, parts=1, want=flooded, address=FLOODER) == ([], False)
    clock.now += STRIKE_PERIODS * 5 + 1
    assert d.assign(stripes, part=0, parts=1, want=flooded, address=FLOODER)[0]


def test_a_host_waiting_for_its_data_keeps_its_batches(published):
    # A host whose stream waits behind the capped uplink has a data request in flight:
    # its other hand-outs are not taken from it, however long the wait.
    registry, entry, _ = published
    clock = Clock()
    d = dispenser(registry, clock=clock)
    stripes = d.image(entry.info_hash_v2)
    first = d.assign(stripes, part=0, parts=1, address=HOST)[0]
    second = d.assign(stripes, part=0, parts=1, address=HOST)[0]
    d.reading_started(stripes, HOST, first[0] * PIECE, (first[-1] + 1) * PIECE - 1)
    clock.now += 60
    other = d.assign(stripes, part=0, parts=1, address="127.0.0.8")[0]
    assert not set(other) & set(second)
    d.reading_ended(stripes, HOST, first[0] * PIECE, (first[-1] + 1) * PIECE - 1, sent=True)
    clock.now += 1
    assert d.assign(stripes, part=0, parts=1, address=HOST)[0]  # not struck


def test_a_range_not_sent_whole_gives_its_pieces_back_at_once(published):
    registry, entry, _ = published
    d = dispenser(registry)
    stripes = d.image(entry.info_hash_v2)
    pieces = d.assign(stripes, part=0, parts=1, address=FLOODER)[0]
    start, end = pieces[0] * PIECE, (pieces[-1] + 1) * PIECE - 1
    d.reading_started(stripes, FLOODER, start, end)
    d.reading_ended(stripes, FLOODER, start, end, sent=False)
    assert d.assign(stripes, part=0, parts=1, address=HOST)[0] == pieces


# -- the server: connections and deadlines -------------------------------------------------


@pytest.fixture
def server(published):
    registry, entry, data = published
    srv = StripeServer(
        "127.0.0.1:0",
        dispenser(registry, clock=time.monotonic),
        rate_limit=0,
        allowed_cidrs=["127.0.0.0/8"],
        limits=ConnectionLimits(per_address=3, total=8, request_timeout=1.0, send_timeout=1.0),
    ).start()
    yield srv, entry, data
    srv.stop()


def connect(srv, source, rcvbuf=None):
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind((source, 0))
    sock.settimeout(10)
    sock.connect(srv.server_address[:2])
    return sock


def closed_within(sock, seconds):
    """Whether the server closes ``sock`` within ``seconds`` (what it sent is read away)."""
    deadline = time.monotonic() + seconds
    sock.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            if not sock.recv(1 << 20):
                return True
        except TimeoutError:
            continue
        except ConnectionResetError:
            return True
    return False


def host_fetches(srv, entry, data, source=HOST):
    client = StripeClient(IMAGE_ID, (srv.url,), entry.info_hash_v2, "", source_host=source)
    try:
        return client.fetch_range(0, 0, MiB - 1) == data[:MiB]
    finally:
        client.close_connections()


def test_a_slowloris_is_shut_down_after_request_timeout(server):
    srv, entry, data = server
    sock = connect(srv, FLOODER)
    started = time.monotonic()
    request = f"GET /v1/torrents/{entry.info_hash_v2}/data HTTP/1.1\r\nRange: bytes=0-9\r\n"
    for ch in request:  # a byte every 0.2 s: each within any socket timeout
        try:
            sock.send(ch.encode())
        except OSError:
            break  # shut down meanwhile
        time.sleep(0.2)
    assert closed_within(sock, 2.0)
    assert time.monotonic() - started < 4.0
    assert srv.guard.reaped["sending its request"] == 1
    assert host_fetches(srv, entry, data)
    sock.close()


def test_a_client_that_asks_and_never_reads_is_shut_down_and_loses_its_pieces(server):
    srv, entry, data = server
    body = json.dumps({"part": 0, "parts": 1, "batches": 16}).encode()
    sock = connect(srv, FLOODER, rcvbuf=4096)
    post = (
        f"POST /v1/torrents/{entry.info_hash_v2}/stripes HTTP/1.1\r\nHost: x\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    sock.sendall(post)
    answer = b""
    while not answer.endswith(b"}"):
        answer += sock.recv(4096)
    pieces = json.loads(answer.split(b"\r\n\r\n", 1)[1])["pieces"]
    assert pieces
    start, end = pieces[0] * PIECE, (pieces[-1] + 1) * PIECE - 1
    sock.sendall(
        f"GET /v1/torrents/{entry.info_hash_v2}/data HTTP/1.1\r\nHost: x\r\n"
        f"Range: bytes={start}-{end}\r\n\r\n".encode()
    )
    # Never reads: the server's write waits, and the reaper ends it once the client has
    # had send_timeout and a second per MiB (1 + 4 s).
    started = time.monotonic()
    while not srv.guard.reaped["reading a range"] and time.monotonic() - started < 10:
        time.sleep(0.1)
    assert 4.5 <= time.monotonic() - started <= 7.0
    assert srv.guard.reaped["reading a range"] == 1
    # What it held goes to the next host that asks, at once.
    stripes = srv.dispenser.image(entry.info_hash_v2)
    again = srv.dispenser.assign(stripes, part=0, parts=1, batches=16, address=HOST)[0]
    assert set(pieces) & set(again)
    assert host_fetches(srv, entry, data)
    sock.close()


def test_connections_over_the_per_address_limit_are_answered_503(server):
    srv, entry, data = server
    held = [connect(srv, FLOODER) for _ in range(3)]
    extra = connect(srv, FLOODER)
    answer = extra.recv(4096)
    assert answer.startswith(b"HTTP/1.1 503") and b"Retry-After" in answer
    assert b"origin_stripe_connections_per_address" in answer
    assert closed_within(extra, 1.0)
    assert host_fetches(srv, entry, data)  # another address is served
    assert srv.guard.turned_away == 1
    for sock in held:
        sock.close()


def test_requests_over_the_busy_limit_are_answered_503(server):
    # Eight requests being served (ranges their clients never read) fill the server's
    # eight request slots: the next complete request is answered 503 at once.
    srv, entry, data = server
    held = []
    for i in range(8):
        sock = connect(srv, f"127.0.0.{10 + i}", rcvbuf=4096)
        sock.sendall(
            f"GET /v1/torrents/{entry.info_hash_v2}/data HTTP/1.1\r\nHost: x\r\n"
            f"Range: bytes=0-{4 * MiB - 1}\r\n\r\n".encode()
        )
        held.append(sock)
    deadline = time.monotonic() + 5
    while srv.guard.busy() < 8 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert srv.guard.busy() == 8
    with pytest.raises(exception.StripeError, match="503"):
        host_fetches(srv, entry, data)
    assert srv.guard.turned_away == 1
    for sock in held:
        sock.close()  # unread: the server's writes fail and the slots are free again
    deadline = time.monotonic() + 5
    while srv.guard.busy() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert host_fetches(srv, entry, data)


def test_idle_connections_are_closed_and_nothing_is_left_open(server, monkeypatch):
    srv, entry, data = server
    from nova_torrent_images.origin.stripe_server import _Handler

    monkeypatch.setattr(_Handler, "timeout", 0.5)
    idle = connect(srv, FLOODER)
    assert closed_within(idle, 2.0)
    idle.close()
    deadline = time.monotonic() + 5
    while srv.guard.open_connections() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.guard.open_connections() == []
