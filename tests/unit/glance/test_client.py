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

"""GlanceClient against a scripted Glance-like server: typed errors, retries, one stream.

The client is a real glanceclient v2 ``Client`` with a 1 s timeout; the server on
127.0.0.1 answers each request as the test's script says (an HTTP status, a truncated
body, a reset, a hang, wrong bytes), then like Glance.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import io
import json
import os
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from unittest import mock

import pytest
from oslo_config import cfg

from nova_torrent_images import conf as nti_conf
from nova_torrent_images import exception
from nova_torrent_images.glance import verify
from nova_torrent_images.glance.client import GlanceClient, error_detail
from nova_torrent_images.testing.http_origin import SCHEMA, _ChunkedReader
from nova_torrent_images.testing.images import image_info

IMAGE_ID = "6f1b7c1e-3c1a-4d7e-9a55-0c2f5d4e8b21"
DATA = os.urandom(3 * 1024 * 1024 + 12345)  # glanceclient reads 1 MiB chunks
TIMEOUT = 1.0  # the client's timeout: a "hang" costs this much per attempt


class ScriptedGlance:
    """A threaded HTTP server playing Glance v2 for one image, misbehaving on cue.

    ``script[kind]`` lists what the next requests of that kind get: an HTTP status, a
    ``(status, body, content_type)`` error answer (``content_type`` None: no header), or
    "truncate", "reset", "hang", "stall", "wrong"; once it is empty the
    answer is correct. Kinds: "show" (GET record), "file" (GET data), "patch", "upload".
    """

    def __init__(self) -> None:
        self.script: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self.requests: list[tuple[str, str, str | None]] = []  # kind, method, Range
        self.uploaded: list[bytes] = []
        self.stop = threading.Event()
        self.record = {
            "id": IMAGE_ID,
            "name": "cirros",
            "status": "active",
            "visibility": "public",
            "disk_format": "raw",
            "container_format": "bare",
            "size": len(DATA),
            "checksum": None,
            "os_hash_algo": "sha512",
            "os_hash_value": hashlib.sha512(DATA).hexdigest(),
            "tags": [],
            "self": f"/v2/images/{IMAGE_ID}",
            "file": f"/v2/images/{IMAGE_ID}/file",
            "schema": "/v2/schemas/image",
        }
        server = self

        class Handler(_Handler):
            glance = server

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda request, address: None  # resets are on purpose
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def count(self, kind: str) -> int:
        return sum(1 for k, _, _ in self.requests if k == kind)

    def ranges(self) -> list[str | None]:
        """The Range header of each data request (None: the whole image)."""
        return [r for k, _, r in self.requests if k == "file"]


class _Handler(BaseHTTPRequestHandler):
    glance: ScriptedGlance
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002
        pass

    def _send(self, status, body=b"", content_type="application/json", headers=()):
        self.send_response(status)
        if body:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _action(self, kind):
        self.glance.requests.append((kind, self.command, self.headers.get("Range")))
        queue = self.glance.script[kind]
        return queue.popleft() if queue else "ok"

    def _fail(self, action) -> bool:
        """Answer with a scripted status or hang; False if the request should go on."""
        if action == "hang":
            self.glance.stop.wait(3 * TIMEOUT)
            self.close_connection = True
            return True
        if isinstance(action, int):
            self._send(action, b"scripted failure", "text/plain")
            return True
        if isinstance(action, tuple):
            status, body, content_type = action
            self.send_response(status)
            if content_type is not None:
                self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return True
        return False

    def do_GET(self):  # noqa: N802
        if self.path == "/v2/schemas/image":
            return self._send(200, json.dumps(SCHEMA).encode())
        if self.path == f"/v2/images/{IMAGE_ID}":
            if not self._fail(self._action("show")):
                self._send(200, json.dumps(self.glance.record).encode())
            return None
        if self.path == f"/v2/images/{IMAGE_ID}/file":
            return self._file(self._action("file"))
        return self._send(404, b"no such thing", "text/plain")

    def _file(self, action):
        if self._fail(action):
            return
        data = DATA
        if action == "wrong":
            data = DATA[:1000] + bytes([DATA[1000] ^ 1]) + DATA[1001:]
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if action in ("truncate", "reset", "stall"):
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            if action == "stall":
                self.glance.stop.wait(3 * TIMEOUT)
            elif action == "reset":  # RST instead of FIN
                linger = struct.pack("ii", 1, 0)
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            else:
                self.connection.shutdown(socket.SHUT_WR)
            self.connection.close()
            self.close_connection = True
            return
        self.wfile.write(data)

    def do_PATCH(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if not self._fail(self._action("patch")):
            self._send(200, json.dumps(self.glance.record).encode())

    def do_PUT(self):  # noqa: N802
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            reader = _ChunkedReader(self.rfile)
            data = b"".join(iter(lambda: reader.read(65536), b""))
        else:
            data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if not self._fail(self._action("upload")):
            self.glance.uploaded.append(data)
            self._send(204)


@pytest.fixture
def server():
    glance = ScriptedGlance()
    glance.thread.start()
    yield glance
    glance.stop.set()
    glance.httpd.shutdown()
    glance.httpd.server_close()


def make_conf(**overrides) -> cfg.ConfigOpts:
    conf = cfg.ConfigOpts()
    nti_conf.register_opts(conf)
    conf([], project="nova-torrent-images", default_config_files=[])
    for name, value in {"glance_retries": 2, "glance_retry_delay": 0.01, **overrides}.items():
        conf.set_override(name, value, group=nti_conf.GROUP)
    return conf


def client(server, **overrides) -> GlanceClient:
    return GlanceClient.for_endpoint(server.url, make_conf(**overrides), timeout=TIMEOUT)


def image():
    return image_info(DATA, IMAGE_ID)


# -- download: failures that stay ------------------------------------------------------
@pytest.mark.parametrize("status", [500, 502, 503, 504, 408, 429])
def test_transient_status_is_retried_then_typed(server, tmp_path, status):
    server.script["file"].extend([status] * 3)
    dest = tmp_path / "img"
    with pytest.raises(exception.GlanceUnavailable) as err:
        client(server).download(image(), str(dest))
    message = str(err.value)
    assert IMAGE_ID in message and "download" in message and f"HTTP {status}" in message
    assert "after 3 attempt(s)" in message and "glance_retries" in message
    assert "[torrent_images] glance_endpoint" in message
    assert server.count("file") == 3
    assert not dest.exists()


@pytest.mark.parametrize("action", ["truncate", "reset"])
def test_broken_body_is_retried_then_typed(server, tmp_path, action):
    server.script["file"].extend([action] * 3)
    dest = tmp_path / "img"
    with pytest.raises(exception.GlanceUnavailable, match="after 3 attempt") as err:
        client(server).download(image(), str(dest))
    assert IMAGE_ID in str(err.value) and "download" in str(err.value)
    assert server.count("file") == 3
    assert not dest.exists()


def test_hang_times_out_then_typed(server, tmp_path):
    server.script["file"].extend(["hang"] * 2)
    dest = tmp_path / "img"
    started = time.monotonic()
    with pytest.raises(exception.GlanceUnavailable) as err:
        client(server, glance_retries=1).download(image(), str(dest))
    took = time.monotonic() - started
    message = str(err.value)
    assert IMAGE_ID in message and "after 2 attempt(s)" in message
    assert "timed out" in message and "[torrent_images] glance_timeout" in message
    assert server.count("file") == 2 and 2 * TIMEOUT <= took < 2 * TIMEOUT + 1.5
    assert not dest.exists()


def test_connection_refused_is_retried_then_typed(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    glance = GlanceClient.for_endpoint(f"http://127.0.0.1:{port}", make_conf(), timeout=TIMEOUT)
    dest = tmp_path / "img"
    with pytest.raises(exception.GlanceUnavailable, match="after 3 attempt") as err:
        glance.download(image(), str(dest))
    assert IMAGE_ID in str(err.value) and "glance_endpoint" in str(err.value)
    assert not dest.exists()


def test_not_found_is_not_retried(server, tmp_path):
    server.script["file"].append(404)
    dest = tmp_path / "img"
    with pytest.raises(exception.ImageNotFound, match=IMAGE_ID):
        client(server).download(image(), str(dest))
    assert server.count("file") == 1 and not dest.exists()


@pytest.mark.parametrize("status", [401, 403])
def test_forbidden_is_not_retried(server, tmp_path, status):
    server.script["file"].append(status)
    dest = tmp_path / "img"
    with pytest.raises(exception.GlanceForbidden) as err:
        client(server).download(image(), str(dest))
    message = str(err.value)
    assert f"refused to download image {IMAGE_ID}: HTTP {status}" in message
    assert "credentials" in message
    assert server.count("file") == 1 and not dest.exists()


@pytest.mark.parametrize("status", [400, 409, 416])
def test_other_client_errors_are_not_retried(server, tmp_path, status):
    server.script["file"].append(status)
    dest = tmp_path / "img"
    with pytest.raises(exception.GlanceError) as err:
        client(server).download(image(), str(dest))
    assert type(err.value) is exception.GlanceError
    assert IMAGE_ID in str(err.value) and f"could not download it: HTTP {status}" in str(err.value)
    assert "not retried" in str(err.value)
    assert server.count("file") == 1 and not dest.exists()


def test_wrong_bytes_are_discarded_not_retried(server, tmp_path):
    server.script["file"].append("wrong")
    dest = tmp_path / "img"
    with mock.patch.object(verify.hmac, "compare_digest", wraps=hmac.compare_digest) as cmp:
        with pytest.raises(exception.IntegrityError, match=IMAGE_ID):
            client(server).download(image(), str(dest))
    cmp.assert_called_once()  # the download's digest check is constant time
    assert server.count("file") == 1 and not dest.exists()


def test_preallocated_destination_is_left_to_its_owner(server, tmp_path):
    server.script["file"].extend([503] * 3)
    slot = tmp_path / "slot"
    slot.write_bytes(b"\0" * len(DATA))
    with pytest.raises(exception.GlanceUnavailable):
        client(server).download(image(), str(slot), preallocated=True)
    assert slot.exists()


# -- download: transient failures, then success -------------------------------------
@pytest.mark.parametrize("failure", [500, 503, 429, "hang"])
def test_transient_failure_then_success(server, tmp_path, failure):
    server.script["file"].append(failure)
    dest = tmp_path / "img"
    assert client(server).download(image(), str(dest)) == len(DATA)
    assert dest.read_bytes() == DATA
    assert server.ranges() == [None, None]


@pytest.mark.parametrize("failure", ["truncate", "reset", "stall"])
def test_broken_body_is_read_again_into_the_same_stream(server, tmp_path, failure):
    server.script["file"].append(failure)
    dest = tmp_path / "img"
    assert client(server).download(image(), str(dest)) == len(DATA)
    assert dest.read_bytes() == DATA
    # The rest is asked for with a Range (none when a reset lost every byte in flight);
    # this server ignores it and sends the whole image, whose first bytes are dropped.
    first, again = server.ranges()
    assert first is None
    if again is not None or failure != "reset":
        assert again.startswith("bytes=") and again.endswith("-")
        assert 0 < int(again[len("bytes=") : -1]) <= len(DATA) // 2


def test_broken_body_into_preallocated_destination(server, tmp_path):
    server.script["file"].extend(["truncate", "reset"])
    slot = tmp_path / "slot"
    slot.write_bytes(b"\xff" * (len(DATA) + 4096))  # a store slot may be larger
    assert client(server).download(image(), str(slot), preallocated=True) == len(DATA)
    assert slot.read_bytes()[: len(DATA)] == DATA


def test_retries_are_bounded_across_broken_bodies(server, tmp_path):
    server.script["file"].extend(["truncate", 503, "reset"])
    dest = tmp_path / "img"
    with pytest.raises(exception.GlanceUnavailable, match="after 3 attempt"):
        client(server).download(image(), str(dest))
    assert not dest.exists()


def test_no_retries_when_set_to_zero(server, tmp_path):
    server.script["file"].append(503)
    with pytest.raises(exception.GlanceUnavailable, match=r"after 1 attempt\(s\)"):
        client(server, glance_retries=0).download(image(), str(tmp_path / "img"))
    assert server.count("file") == 1


# -- iter_data -------------------------------------------------------------------------
@pytest.mark.parametrize("action", ["truncate", "stall"])
def test_iter_data_raises_typed_errors_mid_body(server, action):
    server.script["file"].append(action)
    chunks = client(server, glance_retries=0).iter_data(IMAGE_ID)  # the first chunk came
    with pytest.raises(exception.GlanceUnavailable, match=IMAGE_ID):
        for _ in chunks:
            pass


def test_iter_data_refusal_raises_at_call(server):
    server.script["file"].append(404)
    with pytest.raises(exception.ImageNotFound, match=IMAGE_ID):
        client(server).iter_data(IMAGE_ID)


def test_iter_data_stays_one_stream_across_failures(server):
    server.script["file"].extend(["truncate", "reset"])
    assert b"".join(client(server).iter_data(IMAGE_ID)) == DATA  # no byte twice
    assert server.count("file") == 3


# -- records and properties ------------------------------------------------------------
def test_get_image_retries_then_succeeds(server):
    server.script["show"].extend([503, 500])
    assert client(server).get_image(IMAGE_ID)["size"] == len(DATA)
    assert server.count("show") == 3


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (500, exception.GlanceUnavailable),
        (404, exception.ImageNotFound),
        (403, exception.GlanceForbidden),
        (400, exception.GlanceError),
    ],
)
def test_get_image_errors_are_typed(server, status, error):
    server.script["show"].extend([status] * 3)
    with pytest.raises(error) as err:
        client(server).get_image(IMAGE_ID)
    assert type(err.value) is error and IMAGE_ID in str(err.value)
    assert server.count("show") == (3 if status == 500 else 1)


def test_set_properties_retries(server):
    server.script["patch"].append(503)
    client(server).set_properties(IMAGE_ID, is_torrentable="true")
    assert server.count("patch") == 2


def test_remove_properties_error_names_operation(server):
    server.script["patch"].extend([500] * 3)
    with pytest.raises(exception.GlanceUnavailable) as err:
        client(server).remove_properties(IMAGE_ID, ["torrent_magnet"])
    assert f"remove properties from image {IMAGE_ID} after 3 attempt(s)" in str(err.value)


def test_upload_of_seekable_data_is_retried_from_its_start(server):
    server.script["upload"].append(503)
    data = io.BytesIO(b"header" + DATA)
    data.seek(6)
    client(server).upload(IMAGE_ID, data, len(DATA))
    assert server.uploaded == [DATA] and server.count("upload") == 2


def test_upload_of_a_stream_is_not_retried(server):
    class Stream:
        def __init__(self):
            self._f = io.BytesIO(DATA)

        def read(self, n=-1):
            return self._f.read(n)

    server.script["upload"].append(503)
    with pytest.raises(exception.GlanceUnavailable, match=r"upload data to image .* 1 attempt"):
        client(server).upload(IMAGE_ID, Stream(), len(DATA))
    assert server.count("upload") == 1


def test_defaults_without_conf():
    glance = GlanceClient(client=None)
    assert glance._option("glance_retries") == 3
    assert glance._option("glance_retry_delay") == 1.0


# -- error answers of any shape (issue 26, item 7) ---------------------------------------
# glanceclient reads a JSON error body as a dict of dicts: these bodies made it raise
# AttributeError, KeyError or TypeError, or a JSON error, instead of an HTTP error.
ODD_BODIES = [
    (b'{"error": "injected"}', "application/json"),
    (b"[1,2]", "application/json"),
    (b'"x"', "application/json"),
    (b"42", "application/json"),
    (b'{"e": {"message": 5}, "f": [{"message": null}]}', "application/json"),
    (b"<html><head><title>500</title></head><body>Proxy &amp; error</body></html>", "text/html"),
    (b"<html><body>no json</body></html>", "application/json"),
    (b"", "application/json"),
    (b"", None),
    (b"plain words", None),
    (b"\xff\xfe not utf-8", "text/plain"),
]
ODD_IDS = [
    "json-object",
    "json-list",
    "json-string",
    "json-number",
    "json-nested",
    "html",
    "html-as-json",
    "empty",
    "empty-no-type",
    "no-type",
    "not-utf-8",
]


@pytest.mark.parametrize(("body", "content_type"), ODD_BODIES, ids=ODD_IDS)
def test_a_500_with_any_body_is_glance_unavailable_on_the_metadata_call(server, body, content_type):
    server.script["show"].extend([(500, body, content_type)] * 3)
    with pytest.raises(exception.GlanceUnavailable) as err:
        client(server).image_info(IMAGE_ID)
    message = str(err.value)
    assert IMAGE_ID in message and "show" in message and "HTTP 500" in message
    assert "after 3 attempt(s)" in message  # retried like any 500
    assert server.count("show") == 3


@pytest.mark.parametrize(("body", "content_type"), ODD_BODIES, ids=ODD_IDS)
def test_a_500_with_any_body_is_glance_unavailable_on_a_download(
    server, tmp_path, body, content_type
):
    server.script["file"].extend([(500, body, content_type)] * 3)
    dest = tmp_path / "img"
    with pytest.raises(exception.GlanceUnavailable) as err:
        client(server).download(image(), str(dest))
    message = str(err.value)
    assert IMAGE_ID in message and "download" in message and "HTTP 500" in message
    assert server.count("file") == 3 and not dest.exists()


def test_a_500_with_an_odd_body_then_success(server, tmp_path):
    server.script["show"].append((500, b'{"error": "injected"}', "application/json"))
    server.script["file"].append((503, b"[1,2]", "application/json"))
    glance = client(server)
    assert glance.image_info(IMAGE_ID).size == len(DATA)
    assert glance.download(image(), str(tmp_path / "img")) == len(DATA)
    assert server.count("show") == 2 and server.count("file") == 2


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (404, exception.ImageNotFound),
        (403, exception.GlanceForbidden),
        (400, exception.GlanceError),
    ],
)
@pytest.mark.parametrize("kind", ["show", "file"])
def test_other_statuses_with_odd_bodies_keep_their_type(server, tmp_path, status, error, kind):
    server.script[kind].append((status, b'{"error": "injected"}', "application/json"))
    with pytest.raises(error) as err:
        if kind == "show":
            client(server).get_image(IMAGE_ID)
        else:
            client(server).download(image(), str(tmp_path / "img"))
    assert type(err.value) is error and IMAGE_ID in str(err.value)
    assert server.count(kind) == 1  # not retried


def test_a_500_with_an_odd_body_through_a_keystone_session(server):
    """glanceclient's SessionClient (keystoneauth) reads error bodies the same way."""
    from glanceclient.v2 import client as glance_v2
    from keystoneauth1 import noauth
    from keystoneauth1 import session as ks_session

    session = ks_session.Session(auth=noauth.NoAuth(endpoint=server.url), timeout=TIMEOUT)
    glance = GlanceClient(glance_v2.Client(session=session, endpoint=server.url), make_conf())
    server.script["show"].extend([(500, b'"x"', "application/json")] * 3)
    with pytest.raises(exception.GlanceUnavailable, match="HTTP 500"):
        glance.image_info(IMAGE_ID)
    server.script["file"].extend([(500, b"[1,2]", "application/json")] * 3)
    with pytest.raises(exception.GlanceUnavailable, match="HTTP 500"):
        glance.iter_data(IMAGE_ID)


@pytest.mark.parametrize(
    ("content_type", "body", "detail"),
    [
        ("application/json", b'{"error": "injected"}', '{"error": "injected"}'),
        ("application/json", b"[1,2]", "[1, 2]"),
        ("application/json", b'"x"', '"x"'),
        ("application/json", b"3.5", "3.5"),
        ("application/json", b"null", "null"),
        # Glance's and webob's shapes: the messages.
        ("application/json", b'{"badRequest": {"message": "bad", "code": 400}}', "bad"),
        ("application/json; charset=UTF-8", b'{"message": "m", "code": 500}', "m"),
        ("application/json", b'[{"a": {"message": "one"}}, {"message": 2}]', "one; 2"),
        ("application/json", b"<html><b>x</b></html>", "x"),
        ("application/json", b'{"truncated": ', '{"truncated":'),
        ("text/html", b"<h1>Bad &amp; Gateway</h1>\n<p>nginx</p>", "Bad & Gateway nginx"),
        (None, b"<html>Bad</html>", "Bad"),
        ("text/plain", b"\xff\xfe", "\ufffd\ufffd"),
        (None, b"", ""),
        ("application/json", None, ""),
    ],
)
def test_error_detail_reads_any_body(content_type, body, detail):
    assert error_detail(content_type, body) == detail


def test_error_detail_is_short_for_a_huge_body():
    nested = b"[" * 100_000 + b"]" * 100_000  # deeper than json can parse
    assert len(error_detail("application/json", nested)) <= 300
    assert len(error_detail("text/plain", b"x " * 1_000_000)) <= 300
    deep = json.dumps({"a": [{"b": {"message": str(i)}} for i in range(100)]}).encode()
    assert error_detail("application/json", deep) == "0; 1; 2; 3; 4"
