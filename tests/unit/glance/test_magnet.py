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

"""Magnet URIs in plain Python: strict, bounded parsing and building (no libtorrent)."""

import base64

import pytest

from nova_torrent_images.glance.magnet import (
    MAGNET_MAX_LENGTH,
    MAX_PEER_HINTS,
    MAX_TRACKERS,
    PARSE_MAX_LENGTH,
    Magnet,
    MagnetError,
    build_magnet,
    parse_magnet,
)

V1 = "c12fe1c06bba254a9dc9f519b335aa7c1367a88a"
V2 = "e1f2" * 16

BAD_MAGNETS = {
    "not a magnet": "http://example.com/x.torrent",
    "empty": "",
    "no hash": "magnet:?dn=cirros",
    "short btih": "magnet:?xt=urn:btih:abcdef",
    "non-hex btih": "magnet:?xt=urn:btih:" + "z" * 40,
    "bad base32": "magnet:?xt=urn:btih:" + "1" * 32,
    "btmh not sha256": "magnet:?xt=urn:btmh:1114" + "a" * 40,
    "btmh short": "magnet:?xt=urn:btmh:1220" + "a" * 63,
    "other urn": "magnet:?xt=urn:sha1:" + "a" * 40,
    "two btih": f"magnet:?xt=urn:btih:{V1}&xt=urn:btih:{'b' * 40}",
    "file tracker": f"magnet:?xt=urn:btih:{V1}&tr=file%3A%2F%2F%2Fetc%2Fpasswd",
    "ws tracker": f"magnet:?xt=urn:btih:{V1}&tr=wss%3A%2F%2Ftracker.example%2F",
    "tracker no host": f"magnet:?xt=urn:btih:{V1}&tr=http%3A%2F%2F%2Fannounce",
    "tracker bad port": f"magnet:?xt=urn:btih:{V1}&tr=http%3A%2F%2Fh%3A99999%2Fannounce",
    "peer no port": f"magnet:?xt=urn:btih:{V1}&x.pe=10.0.0.1",
    "peer bad port": f"magnet:?xt=urn:btih:{V1}&x.pe=10.0.0.1:0",
    "peer bad host": f"magnet:?xt=urn:btih:{V1}&x.pe=$(reboot):6881",
    "malformed query": "magnet:?xt",
}


@pytest.mark.parametrize("case", sorted(BAD_MAGNETS))
def test_bad_magnet_is_a_magnet_error(case):
    with pytest.raises(MagnetError):
        parse_magnet(BAD_MAGNETS[case])
    assert issubclass(MagnetError, ValueError)


def test_good_magnet():
    m = parse_magnet(
        f"magnet:?xt=urn:btih:{V1.upper()}&xt=urn:btmh:1220{V2}&dn=cirros"
        "&tr=udp%3A%2F%2F10.0.0.1%3A6969&x.pe=10.0.0.2:6881&tr=udp%3A%2F%2F10.0.0.1%3A6969"
    )
    assert m == Magnet(V1, V2, "cirros", ("udp://10.0.0.1:6969",), (("10.0.0.2", 6881),))
    assert m.best_hash == V2 and Magnet(info_hash_v1=V1).best_hash == V1


def test_base32_btih_is_converted_to_hex():
    b32 = base64.b32encode(bytes.fromhex(V1)).decode()
    assert parse_magnet(f"magnet:?xt=urn:btih:{b32}").info_hash_v1 == V1


def test_web_seeds_in_magnet_are_dropped():
    magnet = parse_magnet(f"magnet:?xt=urn:btih:{V1}&ws=http%3A%2F%2Fevil.example%2Fimg")
    assert "evil" not in magnet.to_uri()


@pytest.mark.parametrize(
    ("value", "kind"), [(None, "NoneType"), (42, "int"), (b"magnet:?", "bytes")]
)
def test_a_value_that_is_not_a_string_says_its_type(value, kind):
    with pytest.raises(MagnetError) as err:
        parse_magnet(value)
    assert kind in str(err.value) and "empty" not in str(err.value)
    with pytest.raises(MagnetError, match="empty"):
        parse_magnet("")


def test_a_magnet_longer_than_hosts_parse_is_refused_unread():
    base = f"magnet:?xt=urn:btih:{V1}&dn="
    at_limit = base + "a" * (PARSE_MAX_LENGTH - len(base))
    assert parse_magnet(at_limit).name == "a" * (PARSE_MAX_LENGTH - len(base))
    with pytest.raises(MagnetError, match=f"more than {PARSE_MAX_LENGTH}"):
        parse_magnet(at_limit + "a")
    with pytest.raises(MagnetError, match="more than 4096"):
        parse_magnet(base + "a" * 10_000_000)


def test_more_than_16_peer_hints_is_refused():
    hints = [f"x.pe=10.0.0.{i}:6881" for i in range(1, MAX_PEER_HINTS + 2)]
    uri = f"magnet:?xt=urn:btih:{V1}&" + "&".join(hints)
    with pytest.raises(MagnetError, match=f"{MAX_PEER_HINTS + 1} x.pe peers, more than 16"):
        parse_magnet(uri)
    assert len(parse_magnet(uri.rsplit("&", 1)[0]).peers) == MAX_PEER_HINTS
    # Repeats are counted once.
    assert len(parse_magnet(uri.rsplit("&", 1)[0] + "&" + hints[0]).peers) == MAX_PEER_HINTS


def test_more_than_16_trackers_is_refused():
    trackers = [f"tr=udp%3A%2F%2Ft{i}.example%3A1" for i in range(MAX_TRACKERS + 1)]
    uri = f"magnet:?xt=urn:btih:{V1}&" + "&".join(trackers)
    with pytest.raises(MagnetError, match=f"{MAX_TRACKERS + 1} trackers, more than 16"):
        parse_magnet(uri)
    assert len(parse_magnet(uri.rsplit("&", 1)[0]).trackers) == MAX_TRACKERS


def test_magnet_length_limit():
    with pytest.raises(MagnetError, match="more than 255"):
        build_magnet(
            info_hash_v1="a" * 40,
            info_hash_v2="b" * 64,
            trackers=[f"http://tracker-{i}.example:6969/announce" for i in range(4)],
        )
    assert MAGNET_MAX_LENGTH == 255


def test_ipv6_peer_hint_round_trip():
    uri = build_magnet(info_hash_v2="b" * 64, peers=[("fd00::1", 6881)])
    assert parse_magnet(uri).peers == (("fd00::1", 6881),)


def test_build_round_trips_and_needs_a_hash():
    m = Magnet(V1, V2, "a name/with?odd&chars", ("http://10.0.0.1:6969/announce",), ())
    assert parse_magnet(m.to_uri()) == m
    with pytest.raises(MagnetError, match="at least one info-hash"):
        build_magnet(name="x")
    with pytest.raises(MagnetError, match="tracker"):
        build_magnet(info_hash_v1=V1, trackers=["ftp://10.0.0.1/"])
