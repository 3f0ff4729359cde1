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
"""A Glance v2 that misbehaves on cue, for test_faults (as tests/unit/test_glance.py's).

It speaks what ``GlanceClient.for_endpoint(url)`` uses to boot an image: the image schema,
``GET /v2/images/<id>`` (the record, any properties the test puts in it, with no 255
character limit) and ``GET /v2/images/<id>/file``. ``script[kind]`` lists what the next
requests of a kind (``show``, ``file``) get, whatever the image: an HTTP status, or

* ``truncate``: half the body, then the connection closed (FIN);
* ``reset``: half the body, then a TCP reset;
* ``hang``: no answer at all for ``hang_seconds``;
* ``stall``: half the body, then nothing for ``hang_seconds``;
* ``wrong``: the whole body with one byte flipped.

Once a kind's list is empty, requests of it are answered correctly.
"""

from __future__ import annotations

import collections
import hashlib
import json
import socket
import struct
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from nova_torrent_images.testing.http_origin import SCHEMA


class FaultyGlance:
    """A threaded HTTP server on 127.0.0.1; a context manager."""

    def __init__(self, hang_seconds: float = 5.0) -> None:
        self.hang_seconds = hang_seconds
        self.images: dict[str, tuple[dict, bytes]] = {}
        self.script: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self.requests: list[tuple[str, str]] = []  # (kind, image id)
        self.stop = threading.Event()
        glance = self

        class Handler(_Handler):
            server_glance = glance

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda request, address: None  # resets are on purpose
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def add_image(self, data: bytes, **properties: object) -> dict:
        """A raw, active image holding ``data``; ``properties`` go into its record."""
        image_id = str(uuid.uuid4())
        record = {
            "id": image_id,
            "name": "fault-image",
            "status": "active",
            "visibility": "public",
            "disk_format": "raw",
            "container_format": "bare",
            "size": len(data),
            "checksum": hashlib.md5(data, usedforsecurity=False).hexdigest(),
            "os_hash_algo": "sha512",
            "os_hash_value": hashlib.sha512(data).hexdigest(),
            "tags": [],
            "self": f"/v2/images/{image_id}",
            "file": f"/v2/images/{image_id}/file",
            "schema": "/v2/schemas/image",
            **properties,
        }
        self.images[image_id] = (record, data)
        return record

    def count(self, kind: str) -> int:
        return sum(1 for k, _ in self.requests if k == kind)

    def __enter__(self) -> FaultyGlance:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    server_glance: FaultyGlance
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002
        pass

    def _send(self, status, body=b"", content_type="application/json"):
        self.send_response(status)
        if body:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _action(self, kind, image_id):
        glance = self.server_glance
        glance.requests.append((kind, image_id))
        queue = glance.script[kind]
        return queue.popleft() if queue else "ok"

    def _fail(self, action) -> bool:
        """Answer with a scripted status or hang; False if the request should go on."""
        if action == "hang":
            self.server_glance.stop.wait(self.server_glance.hang_seconds)
            self.close_connection = True
            return True
        if isinstance(action, int):
            self._send(action, b"scripted failure", "text/plain")
            return True
        return False

    def do_GET(self):  # noqa: N802
        if self.path == "/v2/schemas/image":
            return self._send(200, json.dumps(SCHEMA).encode())
        parts = self.path.split("/")  # "", "v2", "images", id[, "file"]
        if len(parts) in (4, 5) and parts[1:3] == ["v2", "images"]:
            image = self.server_glance.images.get(parts[3])
            if image is not None and len(parts) == 4:
                if not self._fail(self._action("show", parts[3])):
                    self._send(200, json.dumps(image[0]).encode())
                return None
            if image is not None and parts[4] == "file":
                return self._file(self._action("file", parts[3]), image[1])
        return self._send(404, b"no such thing", "text/plain")

    def _file(self, action, data):
        if self._fail(action):
            return
        if action == "wrong":
            data = data[:1000] + bytes([data[1000] ^ 1]) + data[1001:]
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if action in ("truncate", "reset", "stall"):
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            if action == "stall":
                self.server_glance.stop.wait(self.server_glance.hang_seconds)
            elif action == "reset":  # RST instead of FIN
                linger = struct.pack("ii", 1, 0)
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            else:
                self.connection.shutdown(socket.SHUT_WR)
            self.connection.close()
            self.close_connection = True
            return
        self.wfile.write(data)
