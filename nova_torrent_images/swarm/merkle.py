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

"""v2 piece checks in this process: a piece's Merkle root against the torrent's piece layer.

libtorrent checks every piece it downloads or is given with ``add_piece``. A piece this
library writes into the destination itself (a lone host landing the origin's stripes, see
:mod:`nova_torrent_images.swarm.stripe_client`) is checked here instead, from the bytes already in
memory, so it is hashed once and never read back.

BEP 52: the leaves are the SHA-256 of each 16 KiB block (the file's last block may be
short), a missing leaf is 32 zero bytes, and each node is the SHA-256 of its two children.
The *piece layer* (the .torrent's ``piece layers``, outside the info dict) holds the root of
every piece's subtree; it is trusted only once its own root, padded to a power of two with
the root of an all-zero piece, is the file's ``pieces root`` inside the info dict, which
the v2 info-hash names. A file of one piece has no layer: its ``pieces root`` is the
piece's root over as many leaves as the next power of two of its blocks.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import libtorrent as lt

BLOCK = 16 * 1024
_ZERO = b"\0" * 32


def _root(leaves: list[bytes], width: int, pad: bytes = _ZERO) -> bytes:
    """The Merkle root over ``leaves`` padded with ``pad`` to ``width`` (a power of two)."""
    layer = leaves + [pad] * (width - len(leaves))
    while len(layer) > 1:
        layer = [hashlib.sha256(layer[i] + layer[i + 1]).digest() for i in range(0, len(layer), 2)]
    return layer[0]


def _next_power_of_two(n: int) -> int:
    width = 1
    while width < n:
        width *= 2
    return width


def piece_root(data: bytes | bytearray | memoryview, width: int) -> bytes:
    """The root of one piece's subtree: its 16 KiB blocks hashed, padded to ``width`` leaves.

    hashlib lets go of the GIL for each block, so several pieces hash on several cores.
    """
    view = memoryview(data)
    leaves = [hashlib.sha256(view[i : i + BLOCK]).digest() for i in range(0, len(view), BLOCK)]
    return _root(leaves, width)


@dataclass(frozen=True)
class PieceLayer:
    """The verified piece roots of a single-file v2 torrent."""

    piece_length: int
    size: int
    roots: tuple[bytes, ...]

    @property
    def num_pieces(self) -> int:
        return len(self.roots)

    def _width(self) -> int:
        if len(self.roots) == 1:
            return _next_power_of_two(-(-self.size // BLOCK))
        return self.piece_length // BLOCK

    def check(self, piece: int, data: bytes | bytearray | memoryview) -> bool:
        """Whether ``data`` is exactly piece ``piece`` of the torrent."""
        if not 0 <= piece < len(self.roots):
            return False
        expected = min(self.piece_length, self.size - piece * self.piece_length)
        if len(data) != expected:
            return False
        return piece_root(data, self._width()) == self.roots[piece]

    @classmethod
    def from_torrent(cls, data: bytes) -> PieceLayer:
        """The piece layer of a single-file v2 (or hybrid) .torrent, checked against its root.

        Raises ``ValueError`` when the torrent has no v2 part, more than one file, or a
        piece layer that does not hash to the file's ``pieces root``.
        """
        try:
            decoded = lt.bdecode(data)
            info = decoded[b"info"]
            piece_length = int(info[b"piece length"])
            tree = info[b"file tree"]
        except (KeyError, TypeError, RuntimeError) as exc:
            raise ValueError(f"not a v2 torrent: {exc}") from exc
        if len(tree) != 1:
            raise ValueError(f"a v2 torrent of {len(tree)} files, not one")
        node = next(iter(tree.values()))
        try:
            leaf = node[b""]
            size = int(leaf[b"length"])
            root = bytes(leaf[b"pieces root"])
        except (KeyError, TypeError) as exc:
            raise ValueError(f"the file tree holds no single file: {exc}") from exc
        if size <= 0 or piece_length < BLOCK or piece_length & (piece_length - 1):
            raise ValueError(f"file of {size} bytes in pieces of {piece_length}")
        count = -(-size // piece_length)
        if count == 1:
            return cls(piece_length, size, (root,))
        layer = bytes((decoded.get(b"piece layers") or {}).get(root, b""))
        if len(layer) != 32 * count:
            raise ValueError(f"the piece layer holds {len(layer) // 32} of {count} piece roots")
        roots = tuple(layer[i : i + 32] for i in range(0, len(layer), 32))
        # Beyond the last piece the tree holds all-zero pieces: their root pads the layer.
        pad = _root([], piece_length // BLOCK)
        if _root(list(roots), _next_power_of_two(count), pad) != root:
            raise ValueError("the piece layer does not hash to the file's pieces root")
        return cls(piece_length, size, roots)
