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

"""A local HTTP server with one capped uplink: the demo's and the benchmarks' origins.

:class:`~nova_torrent_images.testing.http_origin.HTTPOrigin` and the demo's
:class:`~nova_torrent_images.demo.capped_proxy.CappedProxy` are this server with their
own request handlers. Every response body goes through one token bucket shared by all
connections, as through a real origin's NIC, and is counted.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, BinaryIO

from nova_torrent_images.common.utils import RateLimiter


class OwnedHandler(BaseHTTPRequestHandler):
    """A request handler that knows the :class:`CappedHTTPServer` it serves for."""

    owner: CappedHTTPServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # quiet: the demo and the benchmarks print their own tables


class CappedHTTPServer:
    """``handler`` requests on a free port of ``host``, from a daemon thread.

    Bodies share ``upload_rate`` bytes/s (0: no cap); ``bytes_served`` counts them. A
    context manager: entering starts the server, leaving stops it.
    """

    thread_name = "http-server"

    def __init__(
        self, handler: type[OwnedHandler], host: str = "127.0.0.1", upload_rate: int = 0
    ) -> None:
        self.limiter = RateLimiter(upload_rate)
        self.bytes_served = 0
        self._count_lock = threading.Lock()
        bound = type(handler.__name__, (handler,), {"owner": self})
        self._server = ThreadingHTTPServer((host, 0), bound)
        self._server.daemon_threads = True

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def send_body(self, wfile: BinaryIO, data: bytes) -> None:
        """Write ``data`` to a response through the uplink cap, and count it."""
        self.limiter.take(len(data))
        wfile.write(data)
        with self._count_lock:
            self.bytes_served += len(data)

    def start(self) -> CappedHTTPServer:
        threading.Thread(
            target=self._server.serve_forever, name=self.thread_name, daemon=True
        ).start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> CappedHTTPServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
