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

"""An embedded image origin speaking the subset of the Glance v2 API this project uses.

The demo runs it when glance-api is not installed, and the benchmarks use it as the
"plain HTTP" origin because it can cap its upload rate (a real origin's uplink), which
glance-api cannot. It serves ``python-glanceclient``: image create, upload (computing
``os_hash_value`` like Glance), show, list, JSON-patch update of properties, delete, data
download with ``Range``, and the image schema glanceclient validates against. Not a
Glance replacement: no auth, no stores, no import, everything in one directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from http import HTTPStatus
from typing import Any

from nova_torrent_images.testing.local_http import CappedHTTPServer, OwnedHandler

CHUNK = 256 * 1024
SCHEMA = {
    "name": "image",
    "properties": {"id": {"type": "string"}, "name": {"type": ["null", "string"]}},
    "additionalProperties": {"type": ["null", "string", "integer", "boolean", "array", "object"]},
    "links": [],
}


class HTTPOrigin(CappedHTTPServer):
    """The origin on a free port of ``host``; a context manager."""

    thread_name = "http-origin"

    def __init__(
        self, workdir: str | None = None, host: str = "127.0.0.1", upload_rate: int = 0
    ) -> None:
        self._own_dir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix="nti-origin-")
        os.makedirs(self.workdir, exist_ok=True)
        self.images: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()
        super().__init__(_Handler, host, upload_rate)

    def data_path(self, image_id: str) -> str:
        return os.path.join(self.workdir, image_id)

    def stop(self) -> None:
        super().stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def create_image(self, path: str, name: str = "image", **properties: str) -> dict:
        """Create an active raw image from a file (copied in), like an upload."""
        record = self._new_record(
            {"name": name, "disk_format": "raw", "container_format": "bare", **properties}
        )
        with open(path, "rb") as src:
            self._store_data(record, src)
        return dict(record)

    # -- used by the handler -------------------------------------------------------------
    def _new_record(self, body: dict[str, Any]) -> dict[str, Any]:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        record = {
            "id": body.pop("id", None) or str(uuid.uuid4()),
            "name": body.pop("name", None),
            "status": "queued",
            "visibility": body.pop("visibility", "public"),
            "disk_format": body.pop("disk_format", None),
            "container_format": body.pop("container_format", None),
            "size": None,
            "checksum": None,
            "os_hash_algo": None,
            "os_hash_value": None,
            "created_at": now,
            "updated_at": now,
            "tags": body.pop("tags", []),
            **{k: str(v) for k, v in body.items()},
        }
        record["self"] = f"/v2/images/{record['id']}"
        record["file"] = f"/v2/images/{record['id']}/file"
        record["schema"] = "/v2/schemas/image"
        with self.lock:
            self.images[record["id"]] = record
        return record

    def _store_data(self, record: dict[str, Any], stream: Any, length: int | None = None) -> None:
        sha512, md5, size = hashlib.sha512(), hashlib.md5(), 0  # noqa: S324 Glance's checksum
        with open(self.data_path(record["id"]), "wb") as out:
            while length is None or size < length:
                chunk = stream.read(CHUNK if length is None else min(CHUNK, length - size))
                if not chunk:
                    break
                out.write(chunk)
                sha512.update(chunk)
                md5.update(chunk)
                size += len(chunk)
        with self.lock:
            record.update(
                size=size,
                checksum=md5.hexdigest(),
                os_hash_algo="sha512",
                os_hash_value=sha512.hexdigest(),
                status="active",
            )


class _Handler(OwnedHandler):
    owner: HTTPOrigin

    def _json(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _empty(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _image(self, image_id: str) -> dict[str, Any] | None:
        with self.owner.lock:
            return self.owner.images.get(image_id)

    def do_GET(self) -> None:  # noqa: N802
        path = self.path.split("?")[0]
        if path == "/v2/schemas/image":
            return self._json(200, SCHEMA)
        if path == "/v2/images":
            with self.owner.lock:
                return self._json(200, {"images": list(self.owner.images.values())})
        match = re.fullmatch(r"/v2/images/([^/]+)(/file)?", path)
        image = self._image(match.group(1)) if match else None
        if image is None:
            return self._empty(HTTPStatus.NOT_FOUND)
        if not match.group(2):
            return self._json(200, image)
        return self._send_file(image)

    def _send_file(self, image: dict[str, Any]) -> None:
        if image["status"] != "active":
            return self._empty(HTTPStatus.NO_CONTENT)
        size = image["size"]
        start, end = 0, size - 1
        status = 200
        range_header = self.headers.get("Range")
        if range_header:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", range_header.strip())
            if not m:
                return self._empty(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
            start = int(m.group(1))
            end = min(int(m.group(2)) if m.group(2) else size - 1, size - 1)
            status = 206
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        origin = self.owner
        with open(origin.data_path(image["id"]), "rb") as f:
            f.seek(start)
            left = end - start + 1
            while left > 0:
                chunk = f.read(min(CHUNK, left))
                if not chunk:
                    break
                origin.send_body(self.wfile, chunk)
                left -= len(chunk)

    def do_POST(self) -> None:  # noqa: N802
        if self.path != "/v2/images":
            return self._empty(HTTPStatus.NOT_FOUND)
        record = self.owner._new_record(json.loads(self._body() or b"{}"))
        self._json(201, record)

    def do_PUT(self) -> None:  # noqa: N802
        match = re.fullmatch(r"/v2/images/([^/]+)/file", self.path)
        image = self._image(match.group(1)) if match else None
        if image is None:
            return self._empty(HTTPStatus.NOT_FOUND)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            stream = _ChunkedReader(self.rfile)
            self.owner._store_data(image, stream)
        else:
            self.owner._store_data(image, self.rfile, int(self.headers.get("Content-Length") or 0))
        self._empty(HTTPStatus.NO_CONTENT)

    def do_PATCH(self) -> None:  # noqa: N802
        match = re.fullmatch(r"/v2/images/([^/]+)", self.path)
        image = self._image(match.group(1)) if match else None
        if image is None:
            return self._empty(HTTPStatus.NOT_FOUND)
        with self.owner.lock:
            for op in json.loads(self._body() or b"[]"):
                key = op["path"].lstrip("/")
                if op["op"] in ("add", "replace"):
                    image[key] = op["value"]
                elif op["op"] == "remove":
                    image.pop(key, None)
            image["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            body = dict(image)
        self._json(200, body)

    def do_DELETE(self) -> None:  # noqa: N802
        match = re.fullmatch(r"/v2/images/([^/]+)", self.path)
        with self.owner.lock:
            image = self.owner.images.pop(match.group(1), None) if match else None
        if image is None:
            return self._empty(HTTPStatus.NOT_FOUND)
        try:
            os.unlink(self.owner.data_path(image["id"]))
        except FileNotFoundError:
            pass
        self._empty(HTTPStatus.NO_CONTENT)


class _ChunkedReader:
    """Reads an HTTP/1.1 chunked request body as a plain stream."""

    def __init__(self, rfile: Any) -> None:
        self.rfile, self._left, self._done = rfile, 0, False

    def read(self, n: int) -> bytes:
        if self._done:
            return b""
        if self._left == 0:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                self.rfile.readline()
                self._done = True
                return b""
            self._left = size
        data = self.rfile.read(min(n, self._left))
        self._left -= len(data)
        if self._left == 0:
            self.rfile.readline()  # the CRLF after each chunk
        return data
