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

"""Pieces a lone host writes itself: where they land, what is refused, the hand-over."""

from __future__ import annotations

import os

from nova_torrent_images.swarm.landing import PieceLanding
from nova_torrent_images.swarm.merkle import PieceLayer
from nova_torrent_images.swarm.torrent import make_torrent

PIECE = 256 * 1024
SIZE = 3 * PIECE + 999


def image(tmp_path):
    data = os.urandom(SIZE)
    (tmp_path / "src.raw").write_bytes(data)
    torrent = make_torrent(str(tmp_path / "src.raw"), name="img", version="v2", piece_size=PIECE)
    return data, PieceLayer.from_torrent(torrent.data)


def piece(data, i):
    return bytearray(data[i * PIECE : (i + 1) * PIECE])


def test_pieces_land_at_their_offsets_in_any_order(tmp_path):
    data, _ = image(tmp_path)
    dest = tmp_path / "slot"
    landing = PieceLanding(str(dest), piece_length=PIECE, size=SIZE, layer=None)
    for i in (3, 0, 2, 1):
        assert landing.land(i, piece(data, i)) is True
    assert landing.landed() == {0, 1, 2, 3} and landing.bytes_landed == SIZE
    assert landing.read(3) == piece(data, 3)
    landing.close()
    assert dest.read_bytes() == data


def test_with_a_layer_a_corrupt_piece_is_refused_and_never_written(tmp_path):
    data, layer = image(tmp_path)
    dest = tmp_path / "slot"
    landing = PieceLanding(str(dest), piece_length=PIECE, size=SIZE, layer=layer)
    bad = piece(data, 1)
    bad[10] ^= 0xFF
    assert landing.land(1, bad) is False
    assert landing.land(2, piece(data, 2)) is True
    landing.close()
    assert landing.rejected == 1 and landing.landed() == {2}
    written = dest.read_bytes()
    assert written[PIECE : 2 * PIECE] == b"\0" * PIECE  # a hole, not the corrupt bytes
    assert written[2 * PIECE : 3 * PIECE] == data[2 * PIECE : 3 * PIECE]


def test_after_stop_nothing_lands_and_the_landed_pieces_are_listed(tmp_path):
    data, _ = image(tmp_path)
    landing = PieceLanding(str(tmp_path / "slot"), piece_length=PIECE, size=SIZE, layer=None)
    landing.land(2, piece(data, 2))
    landing.land(0, piece(data, 0))
    assert landing.stop() == [0, 2]
    assert not landing.active
    assert landing.land(1, piece(data, 1)) is None  # the caller hands it to libtorrent
    assert landing.landed() == {0, 2}
    landing.close()


def test_a_device_or_existing_slot_is_written_in_place(tmp_path):
    data, _ = image(tmp_path)
    dest = tmp_path / "slot"
    dest.write_bytes(b"\xee" * (SIZE + 4096))  # preallocated, larger than the image
    landing = PieceLanding(str(dest), piece_length=PIECE, size=SIZE, layer=None)
    for i in range(4):
        landing.land(i, piece(data, i))
    landing.close()
    written = dest.read_bytes()
    assert len(written) == SIZE + 4096 and written[:SIZE] == data
