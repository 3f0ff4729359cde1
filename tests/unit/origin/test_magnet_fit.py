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

"""Magnets of published images: Glance's 255 characters, and what is dropped first."""

import pytest

from nova_torrent_images import exception
from nova_torrent_images.glance.magnet import MAX_PEER_HINTS, MAX_TRACKERS, parse_magnet
from nova_torrent_images.origin.magnet_fit import fit_magnet
from nova_torrent_images.swarm import recipes

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
    # libtorrent joins such a magnet by its v2 hash alone.
    hashes = recipes.info_hashes(m)
    assert hashes.has_v2() and not hashes.has_v1()


def test_more_hints_or_trackers_than_hosts_parse_are_dropped_first():
    peers = [(f"10.0.0.{i}", 6881) for i in range(1, MAX_PEER_HINTS + 3)]
    trackers = [f"udp://t{i}.example:1" for i in range(MAX_TRACKERS + 2)]
    uri, dropped = fit(trackers, peers, max_length=4096)
    m = parse_magnet(uri)  # a host accepts it
    assert len(m.peers) == MAX_PEER_HINTS and len(m.trackers) == MAX_TRACKERS
    assert dropped == [
        f"x.pe=10.0.0.{MAX_PEER_HINTS + 2}:6881",
        f"x.pe=10.0.0.{MAX_PEER_HINTS + 1}:6881",
        f"tr=udp://t{MAX_TRACKERS + 1}.example:1",
        f"tr=udp://t{MAX_TRACKERS}.example:1",
    ]
    uri, _ = fit(trackers, peers)
    assert len(uri) <= 255 and parse_magnet(uri).peers[0] == ("10.0.0.1", 6881)


def test_ipv6_hints_are_bracketed_when_dropped():
    peers = [("fd00::2", 6881), ("fd00::3", 6881)]
    _, dropped = fit(["http://" + "t" * 120 + ":6969/announce"], peers)
    assert "x.pe=[fd00::3]:6881" in dropped


def test_a_tracker_that_does_not_parse_back_is_a_magnet_error():
    with pytest.raises(ValueError, match="tracker"):
        fit(["ftp://10.0.0.1/announce"], [])
