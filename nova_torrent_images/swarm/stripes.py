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

"""A compute host's side of the origin's stripes (see :mod:`nova_torrent_images.origin.stripes`).

:class:`StripeClient` talks to the origin nodes the image's ``torrent_stripes`` property
names: the .torrent, the next batch of pieces, byte ranges. :class:`StripeWorker` runs
beside a :class:`~nova_torrent_images.swarm.transfer.Transfer`: it fetches the batches the
dispenser gives this host and hands each piece to libtorrent with ``add_piece`` (hash-checked
against the torrent like any piece), offers in-order bytes to the image hash so they are
never read back, and, once the dispenser has nothing left and the swarm has gone quiet,
asks for the pieces this host still lacks (a host that took them died or stalls).

Nothing the origin sends is trusted: the .torrent must hash to the magnet's info-hash,
every piece to the torrent, the whole image to Glance's hash.
"""

from __future__ import annotations

import ipaddress
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable

from oslo_log import log as logging

from nova_torrent_images import exception, qos
from nova_torrent_images.utils import parse_host_port

LOG = logging.getLogger(__name__)

HTTP_TIMEOUT = 30.0
# After the dispenser ran dry, how long the swarm may make no progress before this host
# asks for the pieces it lacks (the origin re-issues those given out long enough ago).
QUIET_BEFORE_ASKING = 2.0
STREAMS = 3  # batches a host fetches at once


MAX_STRIPE_URLS = 8


def parse_stripe_urls(value: object, allowed_cidrs: tuple[str, ...]) -> tuple[str, ...]:
    """The stripe URLs of an image property; ValueError says what is wrong.

    Any image owner may write the property, so only ``http://<IP>:<port>`` URLs inside
    ``allowed_peer_cidrs`` are taken: no names to resolve, nothing outside the fabric.
    """
    if not isinstance(value, str):
        raise ValueError(f"it is a {type(value).__name__}, not a string")
    urls = tuple(dict.fromkeys(u.strip() for u in value.split(",") if u.strip()))
    if not urls or len(urls) > MAX_STRIPE_URLS:
        raise ValueError(f"it names {len(urls)} URLs (1 to {MAX_STRIPE_URLS})")
    networks = [ipaddress.ip_network(c, strict=False) for c in allowed_cidrs if c.strip()]
    for url in urls:
        parts = urllib.parse.urlsplit(url)
        try:
            address = ipaddress.ip_address(parts.hostname or "")
            port = parts.port
        except ValueError:
            raise ValueError(f"{url!r} is not http://<IP address>:<port>") from None
        if parts.scheme != "http" or not port or parts.path not in ("", "/"):
            raise ValueError(f"{url!r} is not http://<IP address>:<port>")
        if networks and not any(address in net for net in networks):
            raise ValueError(f"{url!r} is outside allowed_peer_cidrs")
    return urls


class StripeError(exception.TorrentImagesError):
    msg_fmt = "Image %(image_id)s: origin stripes at %(url)s failed: %(reason)s"


class StripeClient:
    """HTTP to the origin nodes of one image (their order is the image property's)."""

    def __init__(self, image_id: str, urls: tuple[str, ...], info_hash: str, peer: str) -> None:
        self.image_id = image_id
        self.urls = urls
        self.info_hash = info_hash
        self.peer = peer
        self._next_part = 0
        self._dry: set[int] = set()  # parts whose node has nothing new left
        self.on_peers: Callable[[list[tuple[str, int]]], None] | None = None
        self._known_peers: set[str] = set()
        self._lock = threading.Lock()  # the worker's streams share the client

    def _open(self, url: str, *, data: bytes | None = None, headers=None) -> bytes:
        request = urllib.request.Request(url, data=data, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:  # noqa: S310
                return response.read()
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise StripeError(image_id=self.image_id, url=url, reason=str(exc)) from exc

    def _base(self, part: int) -> str:
        return f"{self.urls[part].rstrip('/')}/v1/torrents/{self.info_hash}"

    def fetch_torrent(self) -> bytes:
        errors = []
        for part in range(len(self.urls)):
            try:
                return self._open(self._base(part))
            except StripeError as exc:
                errors.append(str(exc))
        raise StripeError(
            image_id=self.image_id, url=", ".join(self.urls), reason="; ".join(errors)
        )

    def next_batch(self, want: list[int] | None = None) -> tuple[int, list[int]] | None:
        """(node, pieces) of the next batch, or None when every node ran dry."""
        parts = len(self.urls)
        for _ in range(parts):
            with self._lock:
                part = self._next_part
                self._next_part = (part + 1) % parts
                if want is None and part in self._dry:
                    continue
            body = json.dumps(
                {"peer": self.peer, "part": part, "parts": parts, "want": want}
            ).encode()
            answer = json.loads(
                self._open(
                    self._base(part) + "/stripes",
                    data=body,
                    headers={"Content-Type": "application/json"},
                )
            )
            self._introduce(answer.get("peers") or [])
            pieces = [int(p) for p in answer.get("pieces", [])]
            if want is None and answer.get("done"):
                with self._lock:
                    self._dry.add(part)
            if pieces:
                return part, pieces
        return None

    def _introduce(self, peers: list[str]) -> None:
        """Tell the torrent about hosts it has not heard of (the origin names them)."""
        new = []
        with self._lock:
            for text in peers[:100]:
                if text in self._known_peers or text == self.peer:
                    continue
                try:
                    new.append(parse_host_port(str(text)))
                except ValueError:
                    LOG.debug("Ignoring peer %r named by the origin", text)
                    continue
                self._known_peers.add(text)
        if new and self.on_peers is not None:
            self.on_peers(new)

    def fetch_range(self, part: int, start: int, end: int) -> bytes:
        data = self._open(self._base(part) + "/data", headers={"Range": f"bytes={start}-{end}"})
        if len(data) != end - start + 1:
            raise StripeError(
                image_id=self.image_id,
                url=self.urls[part],
                reason=f"asked for {end - start + 1} bytes, got {len(data)}",
            )
        return data


class StripeWorker:
    """Fetches this host's stripes into a running torrent, in a thread of its own."""

    def __init__(
        self,
        client: StripeClient,
        *,
        piece_length: int,
        size: int,
        add_piece: Callable[[int, bytes], None],
        missing: Callable[[], list[int]],
        progress: Callable[[], int],
        offer: Callable[[int, bytes], None] | None = None,
    ) -> None:
        self.client = client
        self.piece_length = piece_length
        self.size = size
        self._add_piece = add_piece
        self._missing = missing  # pieces the torrent still lacks
        self._progress = progress  # bytes the torrent has (to tell a quiet swarm)
        self._offer = offer
        self._stop = threading.Event()
        self.failed: StripeError | None = None
        self.bytes_fetched = 0
        self._count_lock = threading.Lock()
        # A few batches in flight: one request at a time leaves the link idle for every
        # round trip and every add_piece copy (measured: a single host at 0.33 of HTTP).
        self._threads = [
            threading.Thread(target=self._run, args=(i == 0,), name=f"stripes-{i}", daemon=True)
            for i in range(STREAMS)
        ]

    def start(self) -> StripeWorker:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=HTTP_TIMEOUT + 5)

    def _run(self, watches_the_tail: bool) -> None:
        qos.lower_thread_priority()  # HTTP reads and add_piece copies: below guests
        try:
            self._fetch_assigned()
            if watches_the_tail:
                self._fetch_what_went_missing()
        except StripeError as exc:
            self.failed = exc
            LOG.warning("%s; the swarm (and the origin's BitTorrent port) carry on", exc)
        except Exception as exc:  # noqa: BLE001  never let the thread die silently
            self.failed = StripeError(
                image_id=self.client.image_id, url=",".join(self.client.urls), reason=repr(exc)
            )
            LOG.exception("Image %s: stripe worker failed", self.client.image_id)

    def _fetch_assigned(self) -> None:
        while not self._stop.is_set():
            batch = self.client.next_batch()
            if batch is None:
                return
            self._fetch(*batch)

    def _fetch_what_went_missing(self) -> None:
        last, quiet_since = self._progress(), time.monotonic()
        while not self._stop.wait(0.2):
            missing = self._missing()
            if not missing:
                return
            done = self._progress()
            if done != last:
                last, quiet_since = done, time.monotonic()
                continue
            if time.monotonic() - quiet_since < QUIET_BEFORE_ASKING:
                continue
            batch = self.client.next_batch(want=missing)
            if batch is not None:
                LOG.info(
                    "Image %s: the swarm went quiet with %d pieces missing; %d re-issued "
                    "by the origin",
                    self.client.image_id,
                    len(missing),
                    len(batch[1]),
                )
                self._fetch(*batch)
            quiet_since = time.monotonic()

    def _fetch(self, part: int, pieces: list[int]) -> None:
        # Contiguous pieces travel in one range request.
        for run in _runs(sorted(pieces)):
            start = run[0] * self.piece_length
            end = min((run[-1] + 1) * self.piece_length, self.size) - 1
            data = self.client.fetch_range(part, start, end)
            with self._count_lock:
                self.bytes_fetched += len(data)
            if self._offer is not None:
                self._offer(start, data)
            for i, piece in enumerate(run):
                self._add_piece(piece, data[i * self.piece_length : (i + 1) * self.piece_length])
            if self._stop.is_set():
                return


def _runs(pieces: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for p in pieces:
        if runs and runs[-1][-1] == p - 1:
            runs[-1].append(p)
        else:
            runs.append([p])
    return runs
