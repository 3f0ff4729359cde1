"""Magnets of published images: Glance's 255 characters, and what is dropped first."""

import pytest

from nova_torrent_images import exception
from nova_torrent_images.origin.publish import fit_magnet, parse_host_port
from nova_torrent_images.swarm.torrent import parse_magnet

IMAGE_ID = "7b4c2b36-5e0f-4d61-9d4f-0e6f3f6a2c11"
V1 = "a032c04529155591311086ece722fe9fc98d7051"
V2 = "9c570948fe2719895f5376ab18e177f3598f76c12a505e71127633f1af60ae5f"


def fit(trackers=(), peers=(), **kwargs):
    return fit_magnet(
        image_id=IMAGE_ID,
        info_hash_v1=V1,
        info_hash_v2=V2,
        trackers=trackers,
        peers=peers,
        **kwargs,
    )


def test_everything_fits_with_one_tracker_and_one_hint():
    uri, dropped = fit(["http://10.0.0.1:6969/announce"], [("10.0.0.2", 6881)])
    assert dropped == [] and len(uri) <= 255
    m = parse_magnet(uri)
    assert (m.info_hash_v1, m.info_hash_v2, m.name) == (V1, V2, IMAGE_ID)
    assert m.trackers == ("http://10.0.0.1:6969/announce",)
    assert m.peers == (("10.0.0.2", 6881),)


def test_drop_order_name_then_v1_then_hints_then_trackers():
    trackers = ["http://tracker-a.example.org:6969/announce", "udp://tracker-b.example.org:6969"]
    peers = [("10.0.0.2", 6881), ("10.0.0.3", 6881), ("10.0.0.4", 6881)]
    uri, dropped = fit(trackers, peers)
    assert len(uri) <= 255
    assert dropped[0] == f"dn={IMAGE_ID}"
    assert dropped[1] == f"xt=urn:btih:{V1}"
    m = parse_magnet(uri)
    assert m.info_hash_v1 is None and m.info_hash_v2 == V2  # the stronger hash stays
    # Later hints go before any tracker does; the first of each stays longest.
    assert m.peers[0] == ("10.0.0.2", 6881) and m.trackers[0] == trackers[0]
    kept = len(m.peers) + len(m.trackers)
    assert kept + len(dropped) == 2 + len(trackers) + len(peers)


def test_only_as_much_is_dropped_as_needed():
    # 243 characters in full; without the name 203.
    uri, dropped = fit(["http://10.0.0.1:6969/announce"], [("10.0.0.2", 6881)], max_length=210)
    assert dropped == [f"dn={IMAGE_ID}"] and len(uri) == 203
    assert parse_magnet(uri).info_hash_v1 == V1


def test_last_hint_goes_only_when_a_tracker_remains():
    long_tracker = "http://" + "t" * 60 + ".example.org:6969/announce"
    # v2 hash 88 + tracker 107 + hint 19 characters: only dropping the hint fits 200.
    uri, dropped = fit([long_tracker], [("10.0.0.2", 6881)], max_length=200)
    assert parse_magnet(uri).peers == () and "x.pe=10.0.0.2:6881" in dropped
    with pytest.raises(exception.MagnetTooLong, match="255|190"):
        fit([], [("h" * 200 + ".example.org", 6881)])


def test_too_long_names_the_settings():
    with pytest.raises(exception.MagnetTooLong) as err:
        fit(["http://" + "x" * 200 + ":6969/announce"], [])
    assert IMAGE_ID in str(err.value)
    assert "origin_trackers" in str(err.value)


def test_v2_only_magnet_of_a_hybrid_torrent_parses():
    uri, _ = fit(["http://" + "x" * 120 + ":6969/announce"], [("10.0.0.2", 6881)])
    m = parse_magnet(uri)
    assert m.info_hash_v1 is None and m.info_hash_v2 == V2
    assert m.info_hashes().has_v2() and not m.info_hashes().has_v1()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("10.0.0.2:6881", ("10.0.0.2", 6881)),
        ("[fd00::2]:6881", ("fd00::2", 6881)),
        ("glance-1.example.org:6881", ("glance-1.example.org", 6881)),
    ],
)
def test_parse_host_port(value, expected):
    assert parse_host_port(value) == expected


@pytest.mark.parametrize("value", ["10.0.0.2", "10.0.0.2:0", "10.0.0.2:70000", "bad host:1", ":1"])
def test_parse_host_port_rejects(value):
    with pytest.raises(ValueError):
        parse_host_port(value)
