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

"""v2 piece checks against libtorrent's own torrents: every piece passes, nothing else."""

from __future__ import annotations

import os

import libtorrent as lt
import pytest

from nova_torrent_images.swarm.merkle import PieceLayer
from nova_torrent_images.swarm.torrent import make_torrent

PIECE = 256 * 1024


def torrent_of(tmp_path, size, version="v2"):
    path = tmp_path / "image.raw"
    data = os.urandom(size)
    path.write_bytes(data)
    return make_torrent(str(path), name="img", version=version, piece_size=PIECE), data


def pieces(data):
    return [data[i : i + PIECE] for i in range(0, len(data), PIECE)]


@pytest.mark.parametrize(
    "size",
    [
        3 * PIECE,  # whole pieces
        5 * PIECE + 12345,  # a short last piece, 6 pieces (the layer is padded to 8)
        100_000,  # one piece, shorter than a piece: no layer, the root is the piece's
        PIECE,  # exactly one piece
    ],
)
@pytest.mark.parametrize("version", ["v2", "hybrid"])
def test_every_piece_of_libtorrents_torrent_passes(tmp_path, size, version):
    torrent, data = torrent_of(tmp_path, size, version)
    layer = PieceLayer.from_torrent(torrent.data)
    assert layer.num_pieces == torrent.num_pieces
    for i, piece in enumerate(pieces(data)):
        assert layer.check(i, piece)
        assert layer.check(i, bytearray(piece))


def test_a_changed_short_or_misplaced_piece_fails(tmp_path):
    torrent, data = torrent_of(tmp_path, 5 * PIECE + 12345)
    layer = PieceLayer.from_torrent(torrent.data)
    first, last = pieces(data)[0], pieces(data)[-1]
    flipped = bytearray(first)
    flipped[PIECE - 1] ^= 1
    assert not layer.check(0, flipped)
    assert not layer.check(0, first[:-1])
    assert not layer.check(1, first)
    assert not layer.check(5, last + b"\0")  # zero padding is no part of the image
    assert not layer.check(6, last) and not layer.check(-1, first)


def test_a_piece_layer_that_does_not_hash_to_the_root_is_refused(tmp_path):
    torrent, _ = torrent_of(tmp_path, 4 * PIECE)
    decoded = lt.bdecode(torrent.data)
    ((root, layer),) = decoded[b"piece layers"].items()
    decoded[b"piece layers"][root] = layer[32:64] + layer[:32] + layer[64:]  # two swapped
    with pytest.raises(ValueError, match="pieces root"):
        PieceLayer.from_torrent(lt.bencode(decoded))
    del decoded[b"piece layers"]
    with pytest.raises(ValueError, match="0 of 4"):
        PieceLayer.from_torrent(lt.bencode(decoded))


def test_a_v1_torrent_has_no_piece_layer(tmp_path):
    torrent, _ = torrent_of(tmp_path, 2 * PIECE, version="v1")
    with pytest.raises(ValueError, match="not a v2 torrent"):
        PieceLayer.from_torrent(torrent.data)
