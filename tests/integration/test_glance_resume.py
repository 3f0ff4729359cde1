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

"""A Glance download broken part way resumes at the break, with a Range request to glance-api."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import threading

from nova_torrent_images.glance.client import GlanceClient

MiB = 1024 * 1024
SIZE = 16 * MiB


class CuttingProxy:
    """TCP to glance-api; the first image-data answer is cut after ``cut_after`` bytes."""

    def __init__(self, upstream: tuple[str, int], cut_after: int) -> None:
        self.upstream = upstream
        self.cut_after = cut_after
        self.cut = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(self.upstream)
        sent = 0  # bytes of answers passed to the client on this connection
        cut_at: list[int] = []  # where the answer to be cut ends (one connection may carry
        # several requests: glanceclient keeps its connections alive)

        def to_upstream() -> None:
            try:
                while data := client.recv(65536):
                    data_request = b"/file " in data and b"range:" not in data.lower()
                    if data_request and not self.cut.is_set() and not cut_at:
                        cut_at.append(sent + self.cut_after)
                    upstream.sendall(data)
            except OSError:
                pass  # either side closed: the other pump ends too

        threading.Thread(target=to_upstream, daemon=True).start()
        try:
            while data := upstream.recv(65536):
                if cut_at and sent + len(data) >= cut_at[0]:
                    client.sendall(data[: cut_at[0] - sent])
                    self.cut.set()
                    break
                client.sendall(data)
                sent += len(data)
        except OSError:
            pass  # the client went away
        finally:
            for s in (client, upstream):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # already closed
                s.close()

    def close(self) -> None:
        self.listener.close()


def test_a_download_broken_at_60_percent_resumes_at_the_break(glance_server, tmp_path):
    path = tmp_path / "image.raw"
    path.write_bytes(os.urandom(SIZE))
    record = glance_server.create_image(str(path))
    host, port = glance_server.url.removeprefix("http://").split(":")
    proxy = CuttingProxy((host, int(port)), cut_after=int(0.6 * SIZE))
    log = str(glance_server.access_log_path)
    offset = os.path.getsize(log)
    try:
        glance = GlanceClient.for_endpoint(proxy.url)
        image = glance.image_info(record["id"])
        dest = tmp_path / "out.raw"
        assert glance.download(image, str(dest)) == SIZE
    finally:
        proxy.close()
    assert proxy.cut.is_set()
    with open(dest, "rb") as f:
        assert hashlib.file_digest(f, "sha512").hexdigest() == record["os_hash_value"]
    with open(log, encoding="utf-8", errors="replace") as f:
        f.seek(offset)
        answers = re.findall(
            rf'"GET /v2/images/{record["id"]}/file HTTP/[0-9.]+" (\d+) (\d+)', f.read()
        )
    statuses = [int(s) for s, _ in answers]
    # The first answer was the whole image (cut by the proxy at 60%); the second, a 206
    # of what followed the break: about 40% of the image, not the whole image again.
    assert statuses == [200, 206], answers
    resumed = int(answers[1][1])
    assert resumed <= 0.45 * SIZE, f"resumed with {resumed / SIZE:.2f} of the image"
