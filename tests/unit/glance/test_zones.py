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

"""Zone properties: written within Glance's limit, parsed strictly, used in zone order."""

from __future__ import annotations

import pytest

from nova_torrent_images.glance.zones import (
    ZoneError,
    ZoneRoute,
    foreign_hints,
    image_routes,
    parse_zone_route,
    plan,
    swarm_hints,
    validate_zone_name,
    zone_property,
)

ROUTE = ZoneRoute(
    "zone-a",
    ("http://10.1.0.5:9480", "http://10.1.0.6:9480"),
    ("http://10.1.0.5:6969/announce",),
    (("10.1.0.5", 6881),),
)


def test_a_route_round_trips_through_its_property():
    value = ROUTE.format()
    assert value == (
        "stripes=http://10.1.0.5:9480,http://10.1.0.6:9480;"
        "trackers=http://10.1.0.5:6969/announce;peers=10.1.0.5:6881"
    )
    assert parse_zone_route("zone-a", value) == ROUTE
    assert zone_property("zone-a") == "torrent_zone_zone-a"


def test_a_route_longer_than_glance_allows_is_refused_when_written():
    stripes = tuple(f"http://10.1.0.{i}:9480" for i in range(8))
    trackers = tuple(f"http://tracker-{i}.zone-a.example:6969/announce" for i in range(4))
    with pytest.raises(ZoneError, match="255"):
        ZoneRoute("zone-a", stripes, trackers).format()


@pytest.mark.parametrize(
    "value, why",
    [
        ("stripes=http://cache.example:9480", "IP address"),
        ("stripes=https://10.0.0.1:9480", "IP address"),
        ("stripes=http://10.0.0.1", "IP address"),
        ("servers=http://10.0.0.1:9480", "not one of"),
        ("stripes=http://10.0.0.1:1;stripes=http://10.0.0.2:1", "twice"),
        ("trackers=ftp://10.0.0.1/announce", "tracker"),
        ("peers=10.0.0.1", "peer"),
        ("peers=" + ",".join(f"10.0.0.{i}:1" for i in range(9)), "at most"),
        (5, "not a string"),
        ("x" * 2000, "characters"),
    ],
)
def test_malformed_routes_are_refused(value, why):
    with pytest.raises(ZoneError, match=why):
        parse_zone_route("zone-a", value)


@pytest.mark.parametrize("name", ["", "-a", "a b", "a/b", "x" * 64, "zone\n"])
def test_zone_names_are_checked(name):
    with pytest.raises(ZoneError):
        validate_zone_name(name)


def properties():
    return {
        "torrent_zone_zone-b": "stripes=http://10.2.0.5:9480",
        "torrent_zone_zone-a": ROUTE.format(),
        "torrent_zone_zone-c": "stripes=nonsense",
        "torrent_zone_bad name": "stripes=http://10.9.0.5:9480",
        "torrent_stripes": "http://10.0.0.5:9480",
        "os_distro": "debian",
    }


def test_an_image_gives_every_readable_zone_and_names_the_rest():
    routes = image_routes(properties(), "torrent_stripes")
    assert routes.zones() == ["zone-a", "zone-b"]
    assert routes.by_zone[None].stripes == ("http://10.0.0.5:9480",)
    assert routes.by_zone["zone-a"] == ROUTE
    assert set(routes.unusable) == {"torrent_zone_zone-c", "torrent_zone_bad name"}


def test_a_host_uses_its_zone_then_the_neutral_list_then_other_zones():
    routes = image_routes(properties(), "torrent_stripes")
    assert [r.zone for r in plan(routes, "zone-b", cross_zone=True)] == ["zone-b", None, "zone-a"]
    assert [r.zone for r in plan(routes, "zone-b", cross_zone=False)] == ["zone-b", None]
    # A zone the image does not know: the neutral list, then the others in name order.
    assert [r.zone for r in plan(routes, "zone-x", cross_zone=True)] == [
        None,
        "zone-a",
        "zone-b",
    ]
    assert plan(routes, "zone-x", cross_zone=False)[0].zone is None
    # A host without a zone keeps to no zone.
    assert [r.zone for r in plan(routes, None, cross_zone=False)] == [None, "zone-a", "zone-b"]


def test_the_magnet_hints_take_the_first_of_every_zone_before_any_second():
    other = ZoneRoute(
        "zone-b",
        trackers=("http://10.2.0.5:6969/announce", "http://10.2.0.6:6969/announce"),
        peers=(("10.2.0.5", 6881), ("10.1.0.5", 6881)),
    )
    trackers, peers = swarm_hints([ROUTE, other])
    assert trackers == [
        "http://10.1.0.5:6969/announce",
        "http://10.2.0.5:6969/announce",
        "http://10.2.0.6:6969/announce",
    ]
    assert peers == [("10.1.0.5", 6881), ("10.2.0.5", 6881)]  # named twice, listed once
    assert swarm_hints([]) == ([], [])


def test_a_host_leaves_the_hints_only_other_zones_name_to_those_zones():
    props = properties()
    props["torrent_zone_zone-b"] = (
        "stripes=http://10.2.0.5:9480;"
        "trackers=http://10.2.0.5:6969/announce,http://10.1.0.5:6969/announce;"
        "peers=10.2.0.5:6881"
    )
    routes = image_routes(props, "torrent_stripes")
    # zone-a's own tracker, which zone-b names too, stays zone-a's.
    assert foreign_hints(routes, "zone-a") == (
        {"http://10.2.0.5:6969/announce"},
        {("10.2.0.5", 6881)},
    )
    assert foreign_hints(routes, "zone-b") == (set(), {("10.1.0.5", 6881)})
    # A zone the image does not know: every zone's hints are another's.
    assert foreign_hints(routes, "zone-x")[0] == {
        "http://10.1.0.5:6969/announce",
        "http://10.2.0.5:6969/announce",
    }
    assert foreign_hints(routes, None) == (set(), set())
