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

"""Stripes landed by this host: written into the destination without libtorrent.

A host that no other host needs pieces from (a lone boot, the most common cold start)
gains nothing from telling libtorrent about the origin's stripes as they arrive, and it
pays for it: ``add_piece`` copies every piece twice in the Python binding, writes it, reads
it back and hashes it. Measured on one host, 512 MiB, no caps (bench/single.py, 2 cores):
2.6 CPU-s with ``add_piece`` against 1.4 CPU-s for plain HTTP. Landed here instead, a
piece is written once from the buffer the HTTP answer was read into and hashed once:

* with a trusted torrent root (``trust_torrent_root``, a v2 torrent bound to Glance's
  hash), its v2 Merkle root is checked here against the torrent's piece layer
  (:mod:`nova_torrent_images.swarm.merkle`) before it is written; a piece that fails is
  dropped and fetched again;
* otherwise the whole-image hash against Glance, fed from the same buffer, is the check
  (nothing unverified reaches a base copy either way).

When another host turns out to need pieces (the origin says others fetch the image, or a
peer that is no seed connects), :meth:`PieceLanding.stop` ends the landing and the pieces
landed so far are handed to libtorrent after all (read back from the page cache), so the
swarm gets them; from then on stripes go through ``add_piece`` as in a fleet. A complete
landed download joins the session afterwards as a seed (seed mode: each piece is checked
the first time a peer asks for it), like any base copy.
"""

from __future__ import annotations

import os
import threading

from nova_torrent_images.swarm.merkle import PieceLayer


class PieceLanding:
    """Pieces written straight into ``destination`` (a new file or a device) by this host."""

    def __init__(
        self, destination: str, *, piece_length: int, size: int, layer: PieceLayer | None
    ) -> None:
        """``layer``: check each piece against it first (a trusted v2 root); None: the
        whole-image hash checks them later."""
        self.destination = destination
        self.piece_length = piece_length
        self.size = size
        self.layer = layer
        self.rejected = 0  # pieces that failed the layer check
        self.bytes_landed = 0
        self._landed: set[int] = set()
        self._active = True
        self._in_flight = 0
        self._lock = threading.Condition()
        # O_CREAT: a new slot file is created as libtorrent would; a device exists.
        self._fd = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)

    @property
    def active(self) -> bool:
        return self._active

    def landed(self) -> set[int]:
        with self._lock:
            return set(self._landed)

    def has(self, piece: int) -> bool:
        return piece in self._landed

    def land(self, piece: int, data: bytes | bytearray) -> bool | None:
        """Check and write one piece: True landed, False failed its check, None: landing
        has stopped (the caller hands the piece to libtorrent instead)."""
        with self._lock:
            if not self._active:
                return None
            self._in_flight += 1
        try:
            if self.layer is not None and not self.layer.check(piece, data):
                self.rejected += 1
                return False
            view = memoryview(data)
            offset, done = piece * self.piece_length, 0
            while done < len(view):
                done += os.pwrite(self._fd, view[done:], offset + done)
            with self._lock:
                if piece not in self._landed:
                    self._landed.add(piece)
                    self.bytes_landed += len(view)
            return True
        finally:
            with self._lock:
                self._in_flight -= 1
                self._lock.notify_all()

    def stop(self) -> list[int]:
        """End the landing; the pieces landed, once no write is in flight."""
        with self._lock:
            self._active = False
            while self._in_flight:
                self._lock.wait()
            return sorted(self._landed)

    def read(self, piece: int) -> bytearray:
        """A landed piece read back (from the page cache, just written)."""
        length = min(self.piece_length, self.size - piece * self.piece_length)
        buffer = bytearray(length)
        with open(self.destination, "rb", buffering=0) as f:
            view, got = memoryview(buffer), 0
            while got < length:
                n = os.preadv(f.fileno(), [view[got:]], piece * self.piece_length + got)
                if not n:
                    raise OSError(f"{self.destination} ends inside piece {piece}")
                got += n
        return buffer

    def close(self) -> None:
        with self._lock:
            self._active = False
            while self._in_flight:
                self._lock.wait()
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
