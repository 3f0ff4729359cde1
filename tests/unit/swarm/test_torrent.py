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

"""Torrents of images: piece sizes, hybrid and single-version creation, reading them back."""

import os

import libtorrent as lt
import pytest

from nova_torrent_images.glance.magnet import parse_magnet
from nova_torrent_images.swarm import torrent
from nova_torrent_images.swarm.torrent import bitfield_to_pieces, pieces_to_bitfield


def test_piece_size_bounds_and_powers_of_two():
    assert torrent.choose_piece_size(1) == 256 * 1024
    assert torrent.choose_piece_size(64 << 20) == 256 * 1024
    assert torrent.choose_piece_size(2 << 30) == 2 << 20
    assert torrent.choose_piece_size(1 << 40) == 16 << 20
    for size in (1, 10 << 20, 700 << 20, 5 << 30, 80 << 30):
        piece = torrent.choose_piece_size(size)
        assert piece & (piece - 1) == 0
        assert size / piece <= torrent.TARGET_PIECES or piece == torrent.MAX_PIECE_SIZE


def test_make_hybrid_torrent_and_magnet(tmp_path):
    path = tmp_path / "local-name.img"
    path.write_bytes(os.urandom(1_000_000))
    tf = torrent.make_torrent(str(path), name="image-id")
    assert tf.name == "image-id"
    assert len(tf.info_hash_v1) == 40 and len(tf.info_hash_v2) == 64
    info = torrent.load_torrent(tf.data)
    assert info.num_files() == 1 and info.layout().file_size(0) == 1_000_000
    assert info.info_hashes().has_v1() and info.info_hashes().has_v2()
    uri = tf.magnet(trackers=["http://10.0.0.1:6969/announce"], peers=[("10.0.0.2", 6881)])
    parsed = parse_magnet(uri)
    assert (parsed.info_hash_v1, parsed.info_hash_v2) == (tf.info_hash_v1, tf.info_hash_v2)
    assert parsed.peers == (("10.0.0.2", 6881),) and parsed.name == "image-id"
    # libtorrent reads our magnet the same way.
    params = lt.parse_magnet_uri(uri)
    assert str(params.info_hashes.v1) == tf.info_hash_v1


@pytest.mark.parametrize("version,v1,v2", [("v1", True, False), ("v2", False, True)])
def test_single_version_torrents(tmp_path, version, v1, v2):
    path = tmp_path / "img"
    path.write_bytes(b"x" * 300_000)
    tf = torrent.make_torrent(str(path), version=version)
    assert bool(tf.info_hash_v1) is v1 and bool(tf.info_hash_v2) is v2


def test_empty_file_is_refused(tmp_path):
    path = tmp_path / "empty"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        torrent.make_torrent(str(path))


def test_unknown_version_is_refused(tmp_path):
    path = tmp_path / "img"
    path.write_bytes(b"x")
    with pytest.raises(ValueError, match="hybrid, v1 or v2"):
        torrent.make_torrent(str(path), version="v3")


def test_magnet_without_name_or_limit(tmp_path):
    path = tmp_path / "img"
    path.write_bytes(b"x" * 1000)
    tf = torrent.make_torrent(str(path), name="image-id")
    assert parse_magnet(tf.magnet(with_name=False)).name is None
    trackers = [f"http://tracker-{i}.example:6969/announce" for i in range(4)]
    assert len(tf.magnet(trackers=trackers, max_length=None)) > 255


@pytest.mark.parametrize("version", ["hybrid", "v1", "v2"])
def test_describe_reads_what_make_torrent_wrote(tmp_path, version):
    path = tmp_path / "img"
    path.write_bytes(os.urandom(700_000))
    tf = torrent.make_torrent(str(path), name="image-id", piece_size=256 * 1024, version=version)
    meta = torrent.describe(tf.data)
    assert meta == torrent.TorrentMeta(
        num_files=1,
        total_size=700_000,
        piece_length=256 * 1024,
        num_pieces=3,
        info_hash_v1=tf.info_hash_v1,
        info_hash_v2=tf.info_hash_v2,
    )


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not bencoded",
        b"d4:infod6:lengthi5eee",
        b"d4:infoi1ee",
        b"i42e",
        b"le",
    ],
)
def test_describe_refuses_what_is_not_a_torrent(data):
    with pytest.raises(ValueError, match="not a valid torrent"):
        torrent.describe(data)


@pytest.mark.parametrize("version", ["v1", "v2", "hybrid"])
def test_make_torrent_is_deterministic(tmp_path, version):
    """Two origin nodes publishing the same image build the same .torrent bytes: no
    creation date (libtorrent's default is the current time), the same creator, whatever
    the local file's name."""
    data = os.urandom(700_000)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = tmp_path / "a" / "image-1", tmp_path / "b" / "staging-xyz"
    first.write_bytes(data)
    second.write_bytes(data)
    one = torrent.make_torrent(str(first), name="img-id", version=version)
    two = torrent.make_torrent(str(second), name="img-id", version=version)
    assert one.data == two.data
    assert (one.info_hash_v1, one.info_hash_v2) == (two.info_hash_v1, two.info_hash_v2)
    meta = lt.bdecode(one.data)
    assert b"creation date" not in meta and meta[b"created by"] == b"nova-torrent-images"


@pytest.mark.parametrize("pieces", [[], [0], [7, 8], list(range(0, 1000, 3)), [999]])
def test_bitfields_round_trip(pieces):
    assert bitfield_to_pieces(pieces_to_bitfield(pieces), 1000) == pieces


def test_a_bitfield_longer_than_the_torrent_is_refused():
    with pytest.raises(ValueError):
        bitfield_to_pieces(pieces_to_bitfield([100]), 50)
