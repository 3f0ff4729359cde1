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

"""The stripe server's bounds (issue 26): request heads, idle connections, slow readers,
the peers a host is told about, and malformed requests.

Each test measures what one abusive client could take of the server before: memory for
huge headers, every connection slot for idle ones, a connection for as long as it reads
slowly, every host's peer list, and an answer altogether.
"""

from __future__ import annotations

import http.client
import json
import logging
import resource
import socket
import threading
import time

import pytest

from nova_torrent_images.origin import dispenser as origin_dispenser
from nova_torrent_images.origin.stripe_guard import ConnectionLimits
from nova_torrent_images.origin.stripe_server import (
    DEFAULT_LIMITS,
    StripeDispenser,
    StripeServer,
)
from nova_torrent_images.swarm.stripe_client import StripeClient
from tests.unit.origin.fakes import IMAGE_ID, Clock, publish_one
from tests.unit.origin.test_stripe_abuse import (
    FLOODER,
    HOST,
    MiB,
    closed_within,
    connect,
    host_fetches,
)

SIZE = 32 * MiB
PIECE = 256 * 1024
SMALL = ConnectionLimits(per_address=16, total=8, request_timeout=1.0, send_timeout=1.0)


@pytest.fixture
def published(tmp_path):
    return publish_one(str(tmp_path / "origin"), SIZE)


def start(registry, limits=SMALL):
    dispenser = StripeDispenser(registry, batch_bytes=MiB, reissue_after=5.0, clock=time.monotonic)
    return StripeServer(
        "127.0.0.1:0",
        dispenser,
        rate_limit=0,
        allowed_cidrs=["127.0.0.0/8"],
        limits=limits,
    ).start()


@pytest.fixture
def server(published):
    registry, entry, data = published
    srv = start(registry)
    yield srv, entry, data
    srv.stop()


def rss() -> int:
    """This process's resident memory in bytes (the server runs in it)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def read_answer(sock, limit=1 << 20):
    """Everything the server sends until it closes ``sock`` (or 5 s pass)."""
    sock.settimeout(5)
    answer = b""
    try:
        while chunk := sock.recv(65536):
            answer += chunk
            if len(answer) > limit:
                break
    except (TimeoutError, ConnectionResetError):
        pass
    return answer


@pytest.fixture
def many_descriptors():
    """Room for a thousand sockets and more (each connection takes two descriptors here)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 2400:
        pytest.skip("needs 2400 file descriptors")
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# -- 1. request heads: bounded like nginx's buffers --------------------------------------


def test_64_connections_sending_huge_headers_grow_the_server_by_under_64_mib(published):
    """Before: 99 headers of 60 KB on each of 64 connections, within the request
    deadline, grew the server from 83 to 453 MiB (it kept every header line)."""
    registry, entry, data = published
    srv = start(registry, DEFAULT_LIMITS)
    line = b"X-Filler: " + b"a" * 60_000 + b"\r\n"
    request = f"GET /v1/torrents/{entry.info_hash_v2} HTTP/1.1\r\nHost: x\r\n".encode()
    socks = []
    try:
        before = rss()
        for i in range(64):
            sock = connect(srv, f"127.0.1.{i // 16 + 1}")  # 16 per address, the limit
            socks.append(sock)
            try:
                sock.sendall(request)
                for _ in range(99):  # no blank line: the request stays incomplete
                    sock.sendall(line)
            except OSError:
                pass  # refused and closed: what the server should do
        time.sleep(0.5)
        growth = rss() - before
        print(f"server RSS growth with 64 such connections: {growth / MiB:.1f} MiB")
        assert growth < 64 * MiB
        assert host_fetches(srv, entry, data)
    finally:
        for sock in socks:
            sock.close()
        srv.stop()


@pytest.mark.parametrize(
    "head,status",
    [
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\n" + b"X-Many: a\r\n" * 65 + b"\r\n", 431),
        (b"GET / HTTP/1.1\r\n" + (b"X-Big: " + b"a" * 7000 + b"\r\n") * 3 + b"\r\n", 431),
        (b"POST / HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n", 413),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 411),
    ],
    ids=["request-line", "header-line", "header-count", "head-bytes", "body", "chunked"],
)
def test_request_heads_past_the_bounds_are_answered_and_closed(server, head, status):
    srv, entry, data = server
    sock = connect(srv, FLOODER)
    try:
        sock.sendall(head)
        answer = read_answer(sock)
        assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:100]
        assert b"Connection: close" in answer  # and closed: read_answer saw the end
        assert host_fetches(srv, entry, data)
    finally:
        sock.close()


# -- 2. idle connections: no thread each, no slot taken from working hosts ---------------


def test_a_host_is_served_beside_560_idle_connections(published, many_descriptors):
    """Before: 16 silent connections from each of 40 addresses filled the server's 512
    (a thread each, 520 threads): a real host got 503 on the torrent, range and stripes."""
    registry, entry, data = published
    srv = start(registry, DEFAULT_LIMITS)
    idle = []
    try:
        threads_before = threading.active_count()
        for i in range(560):  # 14 from each of 40 addresses: within the per-address 16
            idle.append(connect(srv, f"127.0.2.{i % 40 + 1}"))
        time.sleep(0.3)  # all accepted
        started = time.monotonic()
        client = StripeClient(IMAGE_ID, (srv.url,), entry.info_hash_v2, f"{HOST}:6881", HOST)
        try:
            assert client.fetch_torrent() == srv.dispenser.image(entry.info_hash_v2).torrent
            part, pieces = client.next_batch()
            assert pieces
            got = client.fetch_range(part, pieces[0] * PIECE, (pieces[0] + 1) * PIECE - 1)
            assert got == data[pieces[0] * PIECE : (pieces[0] + 1) * PIECE]
        finally:
            client.close_connections()
        took = time.monotonic() - started
        threads = threading.active_count() - threads_before
        print(f"served in {took:.3f} s beside 560 idle connections; {threads} more threads")
        assert threads <= 8  # the loop and a worker or two, not a thread per connection
        assert len(srv.guard.open_connections()) >= 560  # none closed to make room
    finally:
        for sock in idle:
            sock.close()
        srv.stop()


def test_a_connection_that_never_sends_a_byte_is_closed_within_request_timeout(server):
    """Before: a connection that sent nothing was closed only after 120 s."""
    srv, _, _ = server
    sock = connect(srv, FLOODER)
    started = time.monotonic()
    try:
        assert closed_within(sock, 3.0)
        took = time.monotonic() - started
        print(f"silent connection closed after {took:.2f} s (request_timeout 1 s)")
        assert 0.9 <= took <= 1.0 + 0.5
    finally:
        sock.close()


def test_a_full_server_closes_the_longest_silent_connection_for_a_new_one(published):
    registry, entry, data = published
    limits = ConnectionLimits(
        per_address=16, total=4, request_timeout=5.0, send_timeout=1.0, open_total=8
    )
    srv = start(registry, limits)
    silent = [connect(srv, FLOODER) for _ in range(8)]
    try:
        time.sleep(0.2)
        assert host_fetches(srv, entry, data)  # room made: no 503
        assert srv.evicted >= 1 and closed_within(silent[0], 1.0)
    finally:
        for sock in silent:
            sock.close()
        srv.stop()


# -- 3. slow readers: the send deadline holds for the whole answer -----------------------


@pytest.mark.parametrize("what", ["torrent", "piece"])
def test_a_slow_reader_is_cut_within_the_send_deadline(server, what):
    """Before: a client reading a few bytes a second was still connected after 40 s: an
    answer that fits the socket buffers was "sent" at once, and the connection idled."""
    srv, entry, _ = server
    path = f"/v1/torrents/{entry.info_hash_v2}"
    if what == "torrent":  # about 7 KB: send_timeout (1 s)
        request, deadline = f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n", 1.0
        length = len(srv.dispenser.image(entry.info_hash_v2).torrent)
    else:  # 256 KiB: send_timeout and a quarter of a second
        request = f"GET {path}/data HTTP/1.1\r\nHost: x\r\nRange: bytes=0-{PIECE - 1}\r\n\r\n"
        deadline, length = 1.25, PIECE
    sock = connect(srv, FLOODER, rcvbuf=2048)
    try:
        sock.sendall(request.encode())
        started, got = time.monotonic(), 0
        while not srv.guard.open_connections() and time.monotonic() - started < 1.0:
            time.sleep(0.01)  # accepted
        sock.settimeout(0.2)
        # The server's side: the connection is gone once the deadline passed (the bytes
        # already in the client's own receive buffer are its business, not the server's).
        while srv.guard.open_connections() and time.monotonic() - started < deadline + 3.0:
            try:
                got += len(sock.recv(16))  # 80 bytes a second
            except TimeoutError:
                continue
            time.sleep(0.2)
        took = time.monotonic() - started
        # The client's side: what was in its buffer, then the end (a reset, which a zero
        # window may also keep from it); never the whole answer.
        sock.settimeout(1.0)
        try:
            while chunk := sock.recv(65536):
                got += len(chunk)
        except (ConnectionResetError, TimeoutError):
            pass
        print(f"slow reader of the {what} ({length} bytes) cut after {took:.2f} s, {got} read")
        assert not srv.guard.open_connections() and took <= deadline + 1.0
        assert got < length
        assert srv.guard.reaped["reading an answer"] + srv.guard.reaped["reading a range"] == 1
    finally:
        sock.close()


# -- 4. the peers a host is told about ---------------------------------------------------


def test_a_hosts_peer_list_is_free_of_addresses_that_never_connected(server):
    """Before: 25,682 stripe requests from one address, each naming another peer, made
    a real host's next answer name 50 fake peers."""
    srv, entry, _ = server
    conn = http.client.HTTPConnection(*srv.server_address[:2], source_address=(FLOODER, 0))
    # Addresses inside allowed_peer_cidrs (127.0.0.0/8) that never connected.
    named = [f"127.9.{i // 250}.{i % 250 + 1}:6881" for i in range(1000)]
    named += [f"127.0.9.{i % 250 + 1}:{7000 + i}" for i in range(1000)]
    named += [f"0.0.0.0:{8000 + i}" for i in range(10)]  # "my own address, this port"
    served = 0
    try:
        for peer in named:
            body = json.dumps({"peer": peer, "part": 0, "parts": 1}).encode()
            conn.request("POST", f"/v1/torrents/{entry.info_hash_v2}/stripes", body)
            answer = conn.getresponse()
            served += answer.status == 200
            answer.read()
    finally:
        conn.close()
    assert served >= 2000  # served all the same, the peer it names ignored
    host = StripeClient(IMAGE_ID, (srv.url,), entry.info_hash_v2, f"{HOST}:6881", HOST)
    introduced: list[tuple[str, int]] = []
    host.on_peers = introduced.extend
    try:
        host.next_batch()
    finally:
        host.close_connections()
    print(f"peers named to a host after {len(named)} forged requests: {introduced}")
    # The flooder is one entry: its own address, with the last port it named.
    assert introduced == [(FLOODER, 8009)]


def test_hosts_seen_to_make_progress_are_named_before_hosts_that_only_asked(published):
    registry, entry, _ = published
    clock = Clock()
    d = StripeDispenser(registry, batch_bytes=MiB, reissue_after=5.0, clock=clock)
    stripes = d.image(entry.info_hash_v2)
    working = "10.0.0.200"
    d.peers(stripes, f"{working}:6881")
    pieces = d.assign(stripes, part=0, parts=1, address=working)[0]
    d.reading_started(stripes, working, pieces[0] * PIECE, (pieces[-1] + 1) * PIECE - 1)
    d.reading_ended(stripes, working, pieces[0] * PIECE, (pieces[-1] + 1) * PIECE - 1, sent=True)
    for i in range(60):  # asked later, and never fetched a byte
        clock.now += 1
        d.peers(stripes, f"10.0.1.{i + 1}:6881")
    named = d.peers(stripes, "10.0.0.7:6881")
    assert len(named) == origin_dispenser.MAX_PEERS and named[0] == f"{working}:6881"


# -- 5. malformed requests: a 400 and one log line, never a dropped connection -----------


@pytest.mark.parametrize(
    "body",
    [
        b'{"part": Infinity, "parts": 1}',
        b'{"part": 0, "parts": 1, "batches": 1e400}',
        b'{"part": 0, "parts": 1, "want": [NaN]}',
        b'{"part": 0, "parts": -Infinity}',
        b"[" * 50_000 + b"]" * 50_000,
        b'{"part": 0, "parts": 1, "want": [1.5]}',
        b'{"part": "0", "parts": 1}',
        b'{"part": 0, "parts": 1, "peer": 6881}',
    ],
    ids=["infinity", "1e400", "nan", "minus-infinity", "nested", "float", "string", "peer"],
)
def test_a_malformed_stripe_request_is_answered_400_with_one_log_line(server, caplog, body):
    """Before: Infinity, 1e400 and 50,000 nested arrays raised out of the handler (an
    OverflowError, a RecursionError): the connection was dropped without an answer."""
    srv, entry, _ = server
    status, answer = ask(srv, "POST", f"/v1/torrents/{entry.info_hash_v2}/stripes", body, caplog)
    assert status == 400 and b"malformed stripe request" in answer
    assert_one_line(caplog)


@pytest.mark.parametrize(
    "value", ["bytes=" + "9" * 5000 + "-1", "bytes=0-" + "9" * 5000, "bytes=0-" + "0" * 30]
)
def test_a_range_with_thousands_of_digits_is_answered_400_with_one_log_line(server, caplog, value):
    """Before: int() of 5,000 digits raised out of the handler (Python's 4,300-digit
    limit): the connection was dropped without an answer."""
    srv, entry, _ = server
    status, answer = ask(
        srv, "GET", f"/v1/torrents/{entry.info_hash_v2}/data", None, caplog, {"Range": value}
    )
    assert status == 400 and b"malformed Range" in answer
    assert_one_line(caplog)


def ask(srv, method, path, body, caplog, headers=None):
    caplog.clear()
    conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=10)
    try:
        with caplog.at_level(logging.INFO):
            conn.request(method, path, body, headers or {})
            answer = conn.getresponse()
            data = answer.read()
            # Still open: the next request on the connection is answered as well.
            conn.request("GET", path.removesuffix("/stripes").removesuffix("/data"))
            again = conn.getresponse()
            assert again.status == 200
            again.read()
        return answer.status, data
    finally:
        conn.close()


def assert_one_line(caplog):
    records = [
        r
        for r in caplog.records
        if r.name.startswith("nova_torrent_images") and r.levelno >= logging.WARNING
    ]
    assert len(records) == 1, [r.getMessage() for r in records]
    assert records[0].exc_info is None  # a line, not a traceback


def test_a_body_sent_after_100_continue_is_served(server):
    # curl sends a body over 1 KiB only after 100 Continue; the loop reads bodies itself.
    srv, entry, _ = server
    body = json.dumps({"part": 0, "parts": 1, "want": list(range(300))}).encode()
    sock = connect(srv, HOST)
    try:
        sock.sendall(
            f"POST /v1/torrents/{entry.info_hash_v2}/stripes HTTP/1.1\r\nHost: x\r\n"
            f"Expect: 100-continue\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        )
        assert sock.recv(4096) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        answer = b""
        while not answer.endswith(b"}"):
            answer += sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200 ")
    finally:
        sock.close()


def test_pipelined_requests_are_answered_in_order(server):
    srv, entry, data = server
    sock = connect(srv, HOST)
    path = f"/v1/torrents/{entry.info_hash_v2}/data"
    try:
        ask = "GET {} HTTP/1.1\r\nHost: x\r\nRange: bytes={}-{}\r\n\r\n"
        sock.sendall("".join(ask.format(path, i * 10, i * 10 + 9) for i in range(3)).encode())
        answer = b""
        while answer.count(b"HTTP/1.1 206") < 3 or not answer.endswith(data[20:30]):
            answer += sock.recv(65536)
        bodies = [part.split(b"\r\n\r\n", 1)[1][:10] for part in answer.split(b"HTTP/1.1 206")[1:]]
        assert bodies == [data[0:10], data[10:20], data[20:30]]
    finally:
        sock.close()


def test_a_stopped_server_leaves_no_thread_or_connection(published):
    registry, entry, data = published
    before = {t.name for t in threading.enumerate()}
    srv = start(registry)
    assert host_fetches(srv, entry, data)
    kept = connect(srv, FLOODER)
    srv.stop()
    assert closed_within(kept, 1.0)
    kept.close()
    left = {t.name for t in threading.enumerate()} - before
    assert not left, left
    with pytest.raises(OSError):
        socket.create_connection(srv.server_address[:2], timeout=1)
