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

"""The two ways in: an in-process XML-RPC transport and a threaded XML-RPC server.

Both hand the request to :meth:`FakeXenAPI.call`, so they behave the same.
"""

from __future__ import annotations

import socketserver
import sys
import xmlrpc.client
from typing import TYPE_CHECKING, Any
from xmlrpc.server import SimpleXMLRPCRequestHandler, SimpleXMLRPCServer

if TYPE_CHECKING:
    from ._fake import FakeXenAPI


class InProcessTransport(xmlrpc.client.Transport):
    """Hands the client's XML-RPC body straight to the fake: real marshalling, no socket."""

    def __init__(self, fake: FakeXenAPI) -> None:
        super().__init__()
        self._fake = fake

    def request(self, host: Any, handler: Any, request_body: Any, verbose: bool = False) -> Any:
        params, method = xmlrpc.client.loads(request_body)
        answer = self._fake.call(method or "", params)
        body = xmlrpc.client.dumps((answer,), methodresponse=True, allow_none=True)
        parser, unmarshaller = self.getparser()
        parser.feed(body.encode("utf-8"))
        parser.close()
        return unmarshaller.close()


class RequestHandler(SimpleXMLRPCRequestHandler):
    rpc_paths = ()  # any path: XAPI serves "/", xmlrpc.client defaults to "/RPC2"


class XMLRPCServer(socketserver.ThreadingMixIn, SimpleXMLRPCServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128  # the default 5 drops SYNs under concurrent clients (1 s stalls)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client killed while waiting for its answer (FakeXenAPI.kill_after) is no error
        # of the server: say nothing about the answer that found no reader.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class ServerDispatch:
    def __init__(self, fake: FakeXenAPI) -> None:
        self._fake = fake

    def _dispatch(self, method: str, params: tuple[Any, ...]) -> dict[str, Any]:
        return self._fake.call(method, params)
