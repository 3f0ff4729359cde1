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

"""The stripe dispenser and its HTTP endpoints, with the compute host's client."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import pytest

from nova_torrent_images import exception
from nova_torrent_images.common import utils
from nova_torrent_images.origin import dispenser as origin_dispenser
from nova_torrent_images.origin import stripe_server as origin_stripes
from nova_torrent_images.origin.stripe_server import (
    StripeDispenser,
    StripeServer,
    UplinkBooking,
    _Handler,
)
from nova_torrent_images.swarm.stripe_client import StripeClient, StripeWorker, parse_stripe_urls
from nova_torrent_images.swarm.torrent import describe
from tests.unit.origin.fakes import IMAGE_ID, Clock, publish_one

SIZE = 3 * 1024 * 1024 + 4321  # 256 KiB pieces: 13 of them, the last one short


@pytest.fixture(autouse=True)
def whole_image_holds(monkeypatch):
    """These tests are about the hand-out order: an address may hold all of the small
    test image unclaimed (the bounds on holds: test_stripe_abuse.py)."""
    monkeypatch.setattr(origin_dispenser, "HELD_SHARE", 1)


@pytest.fixture
def published(tmp_path):
    return publish_one(str(tmp_path / "origin"), SIZE)


def dispenser(registry, clock=None, batch=512 * 1024, reissue_after=5.0):
    return StripeDispenser(
        registry, batch_bytes=batch, reissue_after=reissue_after, clock=clock or Clock()
    )


def test_batches_are_disjoint_and_cover_every_piece_once(published):
    registry, entry, _ = published
    d = dispenser(registry)
    stripes = d.image(entry.info_hash_v2)
    assert stripes.num_pieces == 13
    for info_hash in (entry.info_hash_v1, entry.info_hash_v2):
        assert info_hash is None or d.image(info_hash) is stripes
    given, done = [], False
    while not done:
        pieces, done = d.assign(stripes, part=0, parts=1)
        assert len(pieces) <= 2  # 512 KiB of 256 KiB pieces
        given += pieces
    assert sorted(given) == list(range(13)) and len(given) == 13
    assert d.assign(stripes, part=0, parts=1) == ([], True)  # late joiners: the swarm


def test_parts_split_the_pieces_between_origin_nodes(published):
    registry, entry, _ = published
    d = dispenser(registry, batch=64 * 1024 * 1024)
    stripes = d.image(entry.info_hash_v2)
    first, _ = d.assign(stripes, part=0, parts=3)
    second, _ = d.assign(stripes, part=1, parts=3)
    assert first == [0, 3, 6, 9, 12] and second == [1, 4, 7, 10]


def test_missing_pieces_are_reissued_only_after_the_lease(published):
    registry, entry, _ = published
    clock = Clock()
    d = dispenser(registry, clock=clock, batch=64 * 1024 * 1024, reissue_after=5.0)
    stripes = d.image(entry.info_hash_v2)
    # One host took every piece, asked for their data, then died.
    d.assign(stripes, part=0, parts=1, address="10.0.0.5")
    d.reading_started(stripes, "10.0.0.5", 0, SIZE - 1)
    d.reading_ended(stripes, "10.0.0.5", 0, SIZE - 1, sent=True)
    other = {"part": 0, "parts": 1, "address": "10.0.0.6"}
    assert d.assign(stripes, want=[3, 4], **other) == ([], False)
    clock.now += 6
    assert d.assign(stripes, want=[3, 4, 99, -1], **other) == ([3, 4], False)
    assert d.assign(stripes, want=[3], **other) == ([], False)  # given again just now


def test_unpublished_hashes_are_unknown(published):
    registry, _, _ = published
    assert dispenser(registry).image("ab" * 32) is None


@pytest.fixture
def server(published):
    registry, entry, data = published
    srv = StripeServer(
        "127.0.0.1:0",
        dispenser(registry),
        rate_limit=0,
        allowed_cidrs=["127.0.0.0/8"],
    ).start()
    yield srv, entry, data
    srv.stop()


def get(url, headers=None):
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {})) as r:
        return r.status, dict(r.headers), r.read()


def test_torrent_and_ranges_are_served_cacheable(server):
    srv, entry, data = server
    base = f"{srv.url}/v1/torrents/{entry.info_hash_v2}"
    status, headers, torrent = get(base)
    assert status == 200 and describe(torrent).info_hash_v2 == entry.info_hash_v2
    assert "immutable" in headers["Cache-Control"] and headers["ETag"]
    status, headers, body = get(base + "/data", {"Range": "bytes=100-299"})
    assert status == 206 and body == data[100:300]
    assert headers["Content-Range"] == f"bytes 100-299/{SIZE}"
    assert srv.bytes_served == 200


def test_a_range_past_the_end_is_served_to_the_end(server):
    # nginx's slice module asks for aligned slices; the last one reaches past the image.
    srv, entry, data = server
    status, headers, body = get(
        f"{srv.url}/v1/torrents/{entry.info_hash_v2}/data",
        {"Range": f"bytes={SIZE - 100}-{SIZE + 1024 * 1024}"},
    )
    assert status == 206 and body == data[-100:]
    assert headers["Content-Range"] == f"bytes {SIZE - 100}-{SIZE - 1}/{SIZE}"


@pytest.mark.parametrize("what", ["", "/data"])
def test_caches_revalidate_with_if_none_match(server, what):
    srv, entry, _ = server
    url = f"{srv.url}/v1/torrents/{entry.info_hash_v2}{what}"
    status, headers, _ = get(url, {"Range": "bytes=0-99"})
    assert status in (200, 206) and headers["Last-Modified"].endswith("GMT")
    for tag in (headers["ETag"], "W/" + headers["ETag"], '"other", ' + headers["ETag"]):
        with pytest.raises(urllib.error.HTTPError) as answer:
            get(url, {"Range": "bytes=0-99", "If-None-Match": tag})
        assert answer.value.code == 304
        assert answer.value.headers["ETag"] == headers["ETag"]
        assert "immutable" in answer.value.headers["Cache-Control"]
    status, _, _ = get(url, {"Range": "bytes=0-99", "If-None-Match": '"other"'})
    assert status in (200, 206)
    assert srv.bytes_served == (200 if what else 0)


@pytest.mark.parametrize(
    "range_header",
    ["", "bytes=5-1", f"bytes={SIZE}-{SIZE + 10}", "bytes=0-10,20-30", "items=0-1"],
)
def test_bad_ranges_are_refused(server, range_header):
    srv, entry, _ = server
    with pytest.raises(urllib.error.HTTPError) as refused:
        get(f"{srv.url}/v1/torrents/{entry.info_hash_v2}/data", {"Range": range_header})
    assert refused.value.code == 416


def test_unknown_images_and_paths_are_404(server):
    srv, _, _ = server
    for path in ("/v1/torrents/" + "ab" * 20, "/v1/torrents/x", "/etc/passwd"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            get(srv.url + path)
        assert refused.value.code == 404


def test_addresses_outside_allowed_cidrs_are_refused(published):
    registry, entry, _ = published
    srv = StripeServer(
        "127.0.0.1:0", dispenser(registry), rate_limit=0, allowed_cidrs=["10.0.0.0/8"]
    ).start()
    try:
        with pytest.raises(urllib.error.HTTPError) as refused:
            get(f"{srv.url}/v1/torrents/{entry.info_hash_v2}")
        assert refused.value.code == 403
    finally:
        srv.stop()


def test_malformed_stripe_requests_are_400(server):
    srv, entry, _ = server
    url = f"{srv.url}/v1/torrents/{entry.info_hash_v2}/stripes"
    for body in (
        b"not json",
        json.dumps({"part": 3, "parts": 2}).encode(),
        json.dumps({"want": "all"}).encode(),
        json.dumps({"zone": ["zone-a"]}).encode(),
        json.dumps({"zone": "../../etc"}).encode(),
    ):
        request = urllib.request.Request(url, data=body)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request)
        assert refused.value.code == 400


def test_client_fetches_torrent_batches_and_ranges(server):
    srv, entry, data = server
    client = StripeClient(IMAGE_ID, (srv.url,), entry.info_hash_v2, "127.0.0.9:6881")
    assert describe(client.fetch_torrent()).info_hash_v2 == entry.info_hash_v2
    seen = []
    while (batch := client.next_batch()) is not None:
        part, pieces = batch
        seen += pieces
    assert sorted(seen) == list(range(13))
    assert client.fetch_range(0, SIZE - 10, SIZE - 1) == data[-10:]


def test_client_errors_are_typed_and_name_the_image():
    client = StripeClient(IMAGE_ID, ("http://127.0.0.1:9",), "ab" * 32, "127.0.0.9:6881")
    with pytest.raises(exception.StripeError, match=IMAGE_ID):
        client.fetch_torrent()


@pytest.mark.parametrize(
    "value,ok",
    [
        ("http://10.0.0.5:8080", True),
        ("http://10.0.0.5:8080/, http://10.0.0.6:8080", True),
        ("http://10.0.0.5", False),  # no port
        ("https://10.0.0.5:8080", False),
        ("http://origin.example:8080", False),  # names are never resolved
        ("http://8.8.8.8:80", False),  # outside allowed_peer_cidrs
        ("http://10.0.0.5:8080/elsewhere", False),
        ("", False),
        (",".join(f"http://10.0.0.{i}:80" for i in range(9)), False),
        (42, False),
    ],
)
def test_stripe_urls_are_parsed_strictly(value, ok):
    if ok:
        assert parse_stripe_urls(value, ("10.0.0.0/8",))
    else:
        with pytest.raises(ValueError):
            parse_stripe_urls(value, ("10.0.0.0/8",))


def test_two_origin_nodes_split_an_image_and_a_restart_starts_afresh(published):
    """Several origin nodes behind one image; an origin restart forgets its hand-outs."""
    registry, entry, data = published

    def node():
        return StripeServer(
            "127.0.0.1:0", dispenser(registry), rate_limit=0, allowed_cidrs=["127.0.0.0/8"]
        ).start()

    first, second = node(), node()
    try:
        client = StripeClient(IMAGE_ID, (first.url, second.url), entry.info_hash_v2, "")
        by_node: dict[int, list[int]] = {0: [], 1: []}
        while (batch := client.next_batch()) is not None:
            by_node[batch[0]] += batch[1]
        assert all(p % 2 == 0 for p in by_node[0]) and all(p % 2 == 1 for p in by_node[1])
        assert sorted(by_node[0] + by_node[1]) == list(range(13))  # each piece once
        # A host fetches each batch from the node that handed it out.
        assert client.fetch_range(1, 0, 99) == data[:100]
        first.stop()
        first = node()  # the restarted node hands its part out again
        again = StripeClient(IMAGE_ID, (first.url, second.url), entry.info_hash_v2, "")
        assert again.next_batch()[0] == 0
    finally:
        first.stop()
        second.stop()


def test_a_host_gets_several_batches_only_while_plenty_are_left(published):
    registry, entry, _ = published
    d = dispenser(registry, batch=256 * 1024)  # one 256 KiB piece per batch
    stripes = d.image(entry.info_hash_v2)
    sizes, given, done = [], [], False
    while not done:
        pieces, done = d.assign(stripes, part=0, parts=1, batches=4)
        sizes.append(len(pieces))
        given += pieces
    # At most a quarter of what is left: the last batches stay small.
    assert sizes == [3, 2, 2, 1, 1, 1, 1, 1, 1] and sorted(given) == list(range(13))
    assert d.assign(stripes, part=0, parts=1, batches=4) == ([], True)


def test_other_hosts_asking_shrink_the_batches(published):
    registry, entry, _ = published
    d = dispenser(registry, batch=256 * 1024)
    stripes = d.image(entry.info_hash_v2)
    d.peers(stripes, "10.0.0.5:6881")
    d.peers(stripes, "10.0.0.6:6881")
    assert d.assign(stripes, part=0, parts=1, batches=4) == ([0], False)  # 13 // (4 * 2)


def test_too_many_batches_are_refused(server):
    srv, entry, _ = server
    body = json.dumps({"part": 0, "parts": 1, "batches": 17}).encode()
    request = urllib.request.Request(f"{srv.url}/v1/torrents/{entry.info_hash_v2}/stripes", body)
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request)
    assert refused.value.code == 400


def count_connections(srv):
    accepted = []
    process = srv.process_request

    def counting(request, address):
        accepted.append(address)
        process(request, address)

    srv.process_request = counting
    return accepted


def test_the_client_keeps_its_connection_between_requests(server):
    srv, entry, data = server
    accepted = count_connections(srv)
    client = StripeClient(IMAGE_ID, (srv.url,), entry.info_hash_v2, "127.0.0.9:6881")
    while client.next_batch() is not None:
        pass
    for start in (0, 1000, SIZE - 10):
        assert client.fetch_range(0, start, start + 9) == data[start : start + 10]
    assert len(accepted) == 1
    assert client.fetch_pieces(0, 0, SIZE - 1, 256 * 1024) == [
        data[i : i + 256 * 1024] for i in range(0, SIZE, 256 * 1024)
    ]
    client.close_connections()
    assert client.fetch_range(0, 0, 9) == data[:10] and len(accepted) == 2
    assert srv.bytes_served == 3 * 10 + SIZE + 10  # exact, with connections kept


def test_an_idle_connection_the_node_closed_is_opened_again(server, monkeypatch):
    srv, entry, data = server
    monkeypatch.setattr(_Handler, "timeout", 0.2)
    accepted = count_connections(srv)
    client = StripeClient(IMAGE_ID, (srv.url,), entry.info_hash_v2, "127.0.0.9:6881")
    assert client.fetch_range(0, 0, 9) == data[:10]
    time.sleep(0.6)  # the node closes the idle connection
    assert client.fetch_range(0, 10, 19) == data[10:20] and len(accepted) == 2


def test_a_stopped_node_no_longer_answers_kept_connections(published):
    registry, entry, data = published
    srv = StripeServer(
        "127.0.0.1:0", dispenser(registry), rate_limit=0, allowed_cidrs=["127.0.0.0/8"]
    ).start()
    client = StripeClient(IMAGE_ID, (srv.url,), entry.info_hash_v2, "127.0.0.9:6881")
    assert client.fetch_range(0, 0, 9) == data[:10]
    srv.stop()
    with pytest.raises(exception.StripeError, match=IMAGE_ID):
        client.fetch_range(0, 0, 9)


def test_rate_limited_ranges_are_served_and_counted(published):
    registry, entry, data = published
    srv = StripeServer(
        "127.0.0.1:0",
        dispenser(registry),
        rate_limit=64 * 1024 * 1024,
        allowed_cidrs=["127.0.0.0/8"],
    ).start()
    try:
        client = StripeClient(IMAGE_ID, (srv.url,), entry.info_hash_v2, "127.0.0.9:6881")
        assert client.fetch_range(0, 5, SIZE - 1) == data[5:]
        assert srv.bytes_served == SIZE - 5
    finally:
        srv.stop()


def make_worker(srv, entry, add_piece, **kwargs):
    """A stripe worker of the test image (13 pieces of 256 KiB), not yet started."""
    client = StripeClient(IMAGE_ID, (srv.url,), entry.info_hash_v2, "127.0.0.9:6881")
    held: set[int] = set()  # what the torrent has: added, or landed by the worker itself

    def added(piece, chunk):
        add_piece(piece, chunk)
        held.add(piece)

    def missing():
        landing = kwargs.get("landing")
        landed = landing.landed() if landing is not None else ()
        return [p for p in range(13) if p not in held and p not in landed]

    return StripeWorker(
        client,
        piece_length=256 * 1024,
        size=SIZE,
        add_piece=added,
        missing=missing,
        progress=lambda: len(held),
        **kwargs,
    )


def run_to_end(worker):
    worker.start()
    for thread in worker._threads:  # nothing missing afterwards: each stream ends
        thread.join(timeout=10)
    worker.stop()


def test_the_worker_adds_every_piece_and_offers_every_byte(server):
    srv, entry, data = server
    added, offered, held_when_added = {}, {}, {}
    lock = threading.Lock()

    def offer(offset, chunk):
        assert threading.current_thread().name == "stripes-hash"  # off the streams
        with lock:
            offered[offset] = bytes(chunk)

    def add_piece(piece, chunk):
        # Until its bytes are offered, a piece is the worker's to hash, nobody's to read.
        held_when_added[piece] = worker.awaits_offer(piece) or offered.get(piece * 256 * 1024)
        added[piece] = bytes(chunk)

    worker = make_worker(srv, entry, add_piece, offer=offer)
    run_to_end(worker)  # the hashing thread has taken every fetched byte when stop returns
    assert worker.failed is None and worker.bytes_fetched == SIZE
    assert all(held_when_added.values()) and len(held_when_added) == 13
    assert not any(worker.awaits_offer(p) for p in range(13))
    assert b"".join(added[p] for p in range(13)) == data
    assert b"".join(offered[o] for o in sorted(offered)) == data


def test_hosts_asking_at_once_after_a_restart_share_one_record(published):
    registry, entry, _ = published
    d = dispenser(registry)
    start = threading.Barrier(8)
    seen = []

    def ask():
        start.wait()
        seen.append(d.image(entry.info_hash_v2))

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({id(s) for s in seen}) == 1  # or each would hand out the first batch again


@pytest.mark.parametrize("rate_limit,expected", [(0, [0, 1, 2]), (64 * 1024 * 1024, [0])])
def test_only_an_uncapped_node_gives_several_batches(published, rate_limit, expected):
    registry, entry, _ = published
    srv = StripeServer(
        "127.0.0.1:0",
        dispenser(registry, batch=256 * 1024),
        rate_limit=rate_limit,
        allowed_cidrs=["127.0.0.0/8"],
    ).start()
    try:
        body = json.dumps({"part": 0, "parts": 1, "batches": 4}).encode()
        request = urllib.request.Request(
            f"{srv.url}/v1/torrents/{entry.info_hash_v2}/stripes", body
        )
        with urllib.request.urlopen(request) as answer:
            assert json.loads(answer.read())["pieces"] == expected
    finally:
        srv.stop()


@pytest.mark.parametrize("extra", [b"", b"x"])
def test_a_chunked_answer_is_counted_exactly(extra):
    """A proxy may answer without a length (chunked): exactly the bytes asked for, or an error."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    body = bytes(range(100)) + extra

    class Chunked(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(206)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(0, len(body), 30):
                chunk = body[i : i + 30]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.write(b"0\r\n\r\n")

    proxy = ThreadingHTTPServer(("127.0.0.1", 0), Chunked)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        client = StripeClient(IMAGE_ID, (f"http://127.0.0.1:{proxy.server_port}",), "ab" * 32, "")
        if extra:
            with pytest.raises(exception.StripeError, match="got more"):
                client.fetch_range(0, 0, 99)
        else:
            assert client.fetch_pieces(0, 0, 99, 64) == [body[:64], body[64:]]
    finally:
        proxy.shutdown()
        proxy.server_close()


# -- the capped uplink: first come, first finished ----------------------------------------
@pytest.fixture
def fake_clock(monkeypatch):
    """time.monotonic and time.sleep of the limiter and the booking, on a fake clock."""

    clock = [50.0]

    def sleep(seconds):
        assert seconds >= 0
        clock[0] += seconds

    for module in (utils, origin_stripes):
        monkeypatch.setattr(module.time, "monotonic", lambda: clock[0])
        monkeypatch.setattr(module.time, "sleep", sleep)
    return clock


def test_responses_are_sent_one_after_another_not_side_by_side(fake_clock):

    limiter = utils.RateLimiter(1000)  # bytes per second
    first, second = UplinkBooking(limiter, 1000), UplinkBooking(limiter, 1000)
    second.wait(500)
    assert fake_clock[0] == 51.0  # the second starts when the first is done
    fake_clock[0] = 50.0
    first.wait(500)
    first.wait(500)
    assert fake_clock[0] == 50.5  # the first, booked first, goes at once and at the cap


def test_a_response_that_falls_behind_books_the_rest_again(fake_clock):

    limiter = utils.RateLimiter(1000)
    stalled = UplinkBooking(limiter, 1000)
    stalled.wait(500)  # due at once
    other = UplinkBooking(limiter, 1000)  # booked for 51.0 to 52.0
    fake_clock[0] += origin_stripes.LATE + 1  # the stalled client read nothing for 1.25 s
    stalled.wait(500)
    assert fake_clock[0] == 52.0  # its rest goes after the booking made meanwhile
    fake_clock[0] = 51.0
    other.wait(1000)
    assert fake_clock[0] == 51.0  # the other one was never held up


def landing_worker(srv, entry, tmp_path, add_piece):
    from nova_torrent_images.swarm.landing import PieceLanding

    landing = PieceLanding(str(tmp_path / "slot"), piece_length=256 * 1024, size=SIZE, layer=None)
    return make_worker(srv, entry, add_piece, landing=landing), landing


def test_a_lone_host_lands_every_piece_and_hands_libtorrent_none(server, tmp_path):
    srv, entry, data = server
    added = {}
    worker, landing = landing_worker(srv, entry, tmp_path, lambda p, d: added.update({p: bytes(d)}))
    run_to_end(worker)
    assert worker.client.others_fetching == 0
    assert not added and landing.landed() == set(range(13))
    landing.close()
    assert (tmp_path / "slot").read_bytes() == data
    # Another host needs pieces after all: every landed piece goes to libtorrent, as stored.
    worker, landing = landing_worker(srv, entry, tmp_path, lambda p, d: added.update({p: bytes(d)}))
    for i in range(13):
        landing.land(i, bytearray(data[i * 256 * 1024 : (i + 1) * 256 * 1024]))
    worker.stop_landing("a test")
    worker._announcing.join(timeout=10)
    assert b"".join(bytes(added[p]) for p in range(13)) == data
    landing.close()


def test_a_host_told_that_others_fetch_lands_nothing(server, tmp_path):
    srv, entry, data = server
    stripes = srv.dispenser.image(entry.info_hash_v2)
    srv.dispenser.peers(stripes, "127.0.0.8:6881")  # another host asked just now
    added = {}
    worker, landing = landing_worker(srv, entry, tmp_path, lambda p, d: added.update({p: bytes(d)}))
    run_to_end(worker)
    assert worker.client.others_fetching == 1
    assert not landing.landed() and not landing.active
    assert b"".join(bytes(added[p]) for p in range(13)) == data
    landing.close()


@pytest.mark.parametrize("keeps", [True, False])
def test_piece_buffers_are_used_again_only_when_nobody_keeps_them(server, keeps):
    srv, entry, data = server
    offered, added = {}, {}

    def offer(offset, chunk):
        offered[offset] = chunk if keeps else bytes(chunk)  # kept: by reference
        return keeps

    worker = make_worker(srv, entry, lambda p, chunk: added.update({p: bytes(chunk)}), offer=offer)
    run_to_end(worker)
    # Whatever was reused, what the hash kept still holds the bytes it was given.
    assert b"".join(bytes(offered[o]) for o in sorted(offered)) == data
    assert b"".join(added[p] for p in range(13)) == data


def test_the_buffer_pool_gives_back_whole_pieces_only_and_keeps_few():
    from nova_torrent_images.swarm.stripe_client import BufferPool

    pool = BufferPool(1024, limit_bytes=2048)
    first, short = pool.get(1024), pool.get(100)
    pool.put(first)
    pool.put(short)  # a last, short piece is not kept
    assert pool.get(1024) is first and len(pool.get(100)) == 100
    for buffer in [bytearray(1024) for _ in range(5)]:
        pool.put(buffer)
    assert len(pool._free) == 2


def test_each_zone_is_handed_every_piece_once_and_meets_only_its_own_hosts(published):
    registry, entry, _ = published
    d = StripeDispenser(
        registry, batch_bytes=64 * 1024 * 1024, reissue_after=5.0, zone="zone-a", clock=Clock()
    )
    base = d.image(entry.info_hash_v2)
    own = d.for_zone(base, "zone-a", "10.1.0.10")
    assert own is base and d.for_zone(base, None, "10.1.0.11") is base
    other = d.for_zone(base, "zone-b", "10.2.0.10")
    assert other is not base and d.for_zone(base, "zone-b", "10.2.0.11") is other
    assert d.assign(base, part=0, parts=1, address="10.1.0.10")[0] == list(range(13))
    # Zone b gets the whole image too: its hosts could get zone a's pieces only across.
    assert d.assign(other, part=0, parts=1, address="10.2.0.10")[0] == list(range(13))
    d.peers(base, "10.1.0.10:6881", address="10.1.0.10")
    d.peers(other, "10.2.0.10:6881", address="10.2.0.10")
    assert d.peers(other, "10.2.0.11:6881", address="10.2.0.11") == ["10.2.0.10:6881"]
    assert d.peers(base, "10.1.0.11:6881", address="10.1.0.11") == ["10.1.0.10:6881"]
    # Ranges are booked where the address asked for its stripes.
    assert d.for_address(base, "10.2.0.10") is other and d.for_address(base, "10.1.0.10") is base
    # A client naming ever more zones gets no more records than the bound.
    for n in range(3 * origin_dispenser.MAX_ZONE_RECORDS):
        d.for_zone(base, f"zone-x{n}", f"10.9.0.{n}")
    assert len(base.zones) == origin_dispenser.MAX_ZONE_RECORDS + 1  # the bound and "*"


def test_a_host_takes_another_zones_nodes_once_its_own_are_down(published):
    registry, entry, data = published
    elsewhere = StripeServer(
        "127.0.0.1:0",
        StripeDispenser(registry, batch_bytes=512 * 1024, reissue_after=5.0, zone="zone-b"),
        rate_limit=0,
        allowed_cidrs=["127.0.0.0/8"],
    ).start()
    try:
        changed = []
        client = StripeClient(
            IMAGE_ID,
            ("http://127.0.0.1:9",),  # the host's own zone's node: nothing listens there
            entry.info_hash_v2,
            "127.0.0.9:6881",
            zone="zone-a",
            urls_zone="zone-a",
            fallback=(("zone-b", (elsewhere.url,)),),
        )
        client.on_fall_back = changed.append
        assert not client.all_down()  # another zone is left to try
        assert describe(client.fetch_torrent()).info_hash_v2 == entry.info_hash_v2
        assert changed == ["zone-b"] and client.urls == (elsewhere.url,)
        seen = []
        while (batch := client.next_batch()) is not None:
            seen += batch[1]
        assert sorted(seen) == list(range(13))
        assert client.fetch_range(0, 0, 99) == data[:100]
        assert client.bytes_by_url == {elsewhere.url: 100}
        # The other zone's node books this host under its zone.
        stripes = elsewhere.dispenser.image(entry.info_hash_v2)
        assert set(stripes.zones) == {"zone-a"} and stripes.given_at == {}
    finally:
        elsewhere.stop()


def test_a_restarted_node_told_what_hosts_hold_hands_out_only_the_rest(published):
    registry, entry, _ = published
    srv = StripeServer(
        "127.0.0.1:0",
        dispenser(registry, batch=64 * 1024 * 1024),
        rate_limit=0,
        allowed_cidrs=["127.0.0.0/8"],
    ).start()
    try:
        client = StripeClient(IMAGE_ID, (srv.url,), entry.info_hash_v2, "127.0.0.9:6881")
        client.have = lambda: [0, 1, 2, 5, 12]  # from its peers before the node restarted
        _, pieces = client.next_batch()
        assert pieces == [3, 4, 6, 7, 8, 9, 10, 11]
        # Another host is not sent what the first holds either; a bad bitfield is a 400.
        other = StripeClient(IMAGE_ID, (srv.url,), entry.info_hash_v2, "127.0.0.8:6881")
        assert other.next_batch() is None
        url = f"{srv.url}/v1/torrents/{entry.info_hash_v2}/stripes"
        for have in ("!!", "AAAAAAAA", 7):
            body = json.dumps({"have": have}).encode()
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(urllib.request.Request(url, data=body))
            assert refused.value.code == 400
    finally:
        srv.stop()
