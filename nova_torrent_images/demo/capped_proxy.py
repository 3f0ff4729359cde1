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

"""A read-only HTTP proxy with one capped uplink, in front of the demo's Glance.

The demo's plain HTTP column fetches the image from the same Glance (glance-api or the
embedded origin) through the same uplink cap as the origin seeder has; glance-api cannot
cap its own upload, so the demo puts this in front of it. It forwards GET and HEAD
requests (headers included, so ``noauth`` Glance works through it) and sends every
response body through one token bucket shared by all connections. Demo use only.
"""

from __future__ import annotations

import http.client
import urllib.parse

from nova_torrent_images.testing.local_http import CappedHTTPServer, OwnedHandler

CHUNK = 256 * 1024
# Hop-by-hop headers (RFC 9110 7.6.1) are not forwarded; the body is framed anew.
_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}


class CappedProxy(CappedHTTPServer):
    """``url`` forwards to ``upstream``; bodies share ``upload_rate`` bytes/s."""

    thread_name = "capped-proxy"

    def __init__(self, upstream: str, upload_rate: int, host: str = "127.0.0.1") -> None:
        parts = urllib.parse.urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port or 80)
        self.prefix = parts.path.rstrip("/")
        super().__init__(_Handler, host, upload_rate)


class _Handler(OwnedHandler):
    owner: CappedProxy

    def do_HEAD(self) -> None:  # noqa: N802
        self._forward(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._forward(body=True)

    def _forward(self, body: bool) -> None:
        owner = self.owner
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
        upstream = http.client.HTTPConnection(*owner.upstream, timeout=600)
        try:
            upstream.request(self.command, owner.prefix + self.path, headers=headers)
            response = upstream.getresponse()
            self.send_response(response.status, response.reason)
            for key, value in response.getheaders():
                if key.lower() not in _HOP:
                    self.send_header(key, value)
            length = response.getheader("Content-Length")
            chunked = body and length is None
            if chunked:
                self.send_header("Transfer-Encoding", "chunked")
            elif length is not None:
                self.send_header("Content-Length", length)
            self.end_headers()
            if not body:
                return
            while True:
                data = response.read(CHUNK)
                if not data:
                    break
                if chunked:
                    self.wfile.write(b"%x\r\n" % len(data))
                owner.send_body(self.wfile, data)
                if chunked:
                    self.wfile.write(b"\r\n")
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
        except OSError:
            self.close_connection = True
        finally:
            upstream.close()
