import os

import libtorrent as lt
import pytest

from nova_torrent_images.swarm import torrent


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
    parsed = torrent.parse_magnet(uri)
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


def test_magnet_length_limit():
    with pytest.raises(torrent.MagnetError, match="more than 255"):
        torrent.build_magnet(
            info_hash_v1="a" * 40,
            info_hash_v2="b" * 64,
            trackers=[f"http://tracker-{i}.example:6969/announce" for i in range(4)],
        )


def test_ipv6_peer_hint_round_trip():
    uri = torrent.build_magnet(info_hash_v2="b" * 64, peers=[("fd00::1", 6881)])
    assert torrent.parse_magnet(uri).peers == (("fd00::1", 6881),)


def test_empty_file_is_refused(tmp_path):
    path = tmp_path / "empty"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        torrent.make_torrent(str(path))
