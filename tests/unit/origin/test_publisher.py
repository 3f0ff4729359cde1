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

"""Publisher against an in-memory Glance: idempotency, errors, rollback, unpublish, check."""

from __future__ import annotations

import os

import pytest

from nova_torrent_images import exception
from nova_torrent_images.common.utils import parse_host_port
from nova_torrent_images.glance.magnet import parse_magnet
from nova_torrent_images.origin.publisher import Publisher
from nova_torrent_images.origin.tracker import read_whitelist
from nova_torrent_images.swarm.torrent import describe, load_torrent
from nova_torrent_images.testing.swarm import make_conf
from tests.unit.origin.fakes import IMAGE_ID, FakeGlance


@pytest.fixture
def glance():
    return FakeGlance()


@pytest.fixture
def conf(tmp_path):
    return make_conf(
        origin_state_dir=str(tmp_path / "origin"),
        origin_trackers=["http://10.0.0.1:6969/announce"],
        origin_advertise_addresses=["10.0.0.2:6881"],
        tracker_whitelist_path=str(tmp_path / "whitelist.txt"),
    )


@pytest.fixture
def publisher(conf, glance):
    return Publisher(conf, glance)


def snapshot(root) -> dict[str, int]:
    """mtime of every file under ``root``: 'nothing was written' made checkable."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            out[path] = os.stat(path).st_mtime_ns
    return out


def test_publish_writes_registry_whitelist_and_glance(publisher, glance, tmp_path):
    record = glance.add()
    result = publisher.publish(IMAGE_ID)

    assert result.status == "published" and result.bytes_from_glance == record["size"]
    entry = publisher.registry.get(IMAGE_ID)
    assert entry.size == record["size"] and entry.hash_value == record["os_hash_value"]
    assert entry.checksum == record["checksum"]
    assert entry.glance_updated_at == "2026-01-01T00:00:00Z"
    with open(entry.data_path, "rb") as f:
        assert f.read() == glance.data[IMAGE_ID]
    info = load_torrent(open(entry.torrent_path, "rb").read())
    assert info.name() == IMAGE_ID
    assert describe(open(entry.torrent_path, "rb").read()).total_size == record["size"]
    assert not info.info_hashes().has_v1() and info.info_hashes().has_v2()  # v2 by default
    assert str(info.info_hashes().v2) == entry.info_hash_v2 == result.info_hash_v2
    assert entry.torrent_format == "v2"
    assert read_whitelist(str(tmp_path / "whitelist.txt")) == set(entry.tracker_hashes)
    bound = f"sha512:{record['os_hash_value']}:{entry.info_hash_v2}"
    assert glance.updates == [
        (
            IMAGE_ID,
            {
                "torrent_magnet": result.magnet,
                "is_torrentable": "true",
                "torrent_bound_hash": bound,
            },
        )
    ]
    magnet = parse_magnet(result.magnet)
    assert magnet.trackers == ("http://10.0.0.1:6969/announce",)
    assert magnet.peers == (("10.0.0.2", 6881),)
    assert entry.set_torrentable is True


def test_publishing_an_unchanged_image_changes_nothing(publisher, glance, tmp_path):
    glance.add()
    first = publisher.publish(IMAGE_ID)
    before = snapshot(tmp_path)

    second = publisher.publish(IMAGE_ID)

    assert second.status == "unchanged" and second.magnet == first.magnet
    assert glance.downloads == 1 and len(glance.updates) == 1
    assert snapshot(tmp_path) == before


def test_lost_glance_properties_are_set_again_without_reading_the_image(publisher, glance):
    glance.add()
    publisher.publish(IMAGE_ID)
    glance.remove_properties(IMAGE_ID, ["torrent_magnet"])

    result = publisher.publish(IMAGE_ID)

    assert result.status == "updated" and glance.downloads == 1
    assert glance.updates[-1] == (IMAGE_ID, {"torrent_magnet": result.magnet})


def test_new_tracker_setting_changes_the_magnet(publisher, glance, conf):
    glance.add()
    first = publisher.publish(IMAGE_ID)
    conf.set_override("origin_trackers", ["udp://10.0.0.9:6969"], "torrent_images")

    result = publisher.publish(IMAGE_ID)

    assert result.status == "updated" and result.magnet != first.magnet
    assert parse_magnet(result.magnet).trackers == ("udp://10.0.0.9:6969",)
    assert publisher.registry.get(IMAGE_ID).magnet == result.magnet


def test_replaced_image_data_is_published_again(publisher, glance):
    glance.add()
    first = publisher.publish(IMAGE_ID)
    glance.add(size=700_000)  # same id, other bytes (a location replaced by an admin)

    result = publisher.publish(IMAGE_ID)

    assert result.status == "published" and glance.downloads == 2
    assert result.info_hash_v2 != first.info_hash_v2
    assert publisher.registry.get(IMAGE_ID).size == 700_000


def test_missing_data_is_read_again(publisher, glance):
    glance.add()
    publisher.publish(IMAGE_ID)
    os.unlink(publisher.registry.get(IMAGE_ID).data_path)

    assert publisher.publish(IMAGE_ID).status == "published"
    assert glance.downloads == 2 and publisher.registry.get(IMAGE_ID).has_data()


@pytest.mark.parametrize(
    ("fields", "error", "message"),
    [
        ({"status": "queued", "size": None, "os_hash_value": None, "os_hash_algo": None},
         exception.NotPublishable, "it is queued, not active"),
        ({"status": "deactivated"}, exception.NotPublishable, "it is deactivated, not active"),
        ({"disk_format": "qcow2"}, exception.NotPublishable, "disk format is qcow2; only raw"),
        ({"os_hash_algo": None, "os_hash_value": None, "checksum": None},
         exception.NotPublishable, "cannot be verified"),
    ],
)  # fmt: skip
def test_unpublishable_images_change_nothing(publisher, glance, tmp_path, fields, error, message):
    glance.add(**fields)
    with pytest.raises(error, match=message) as err:
        publisher.publish(IMAGE_ID)
    assert IMAGE_ID in str(err.value)
    assert publisher.registry.list() == [] and glance.updates == [] and glance.downloads == 0
    assert not os.path.exists(tmp_path / "whitelist.txt")
    assert os.listdir(publisher.registry.images_dir) == []


def test_missing_image(publisher, glance, tmp_path):
    with pytest.raises(exception.ImageNotFound, match=f"Image {IMAGE_ID} was not found"):
        publisher.publish(IMAGE_ID)
    assert publisher.registry.list() == [] and not os.path.exists(tmp_path / "whitelist.txt")


def test_failed_glance_update_undoes_the_publish(publisher, glance, tmp_path):
    glance.add()
    glance.fail_updates = True
    with pytest.raises(exception.GlanceError, match="409"):
        publisher.publish(IMAGE_ID)
    assert publisher.registry.list() == []
    assert os.listdir(publisher.registry.images_dir) == []
    assert read_whitelist(str(tmp_path / "whitelist.txt")) == set()


def test_no_tracker_and_no_hint_is_a_config_error(conf, glance):
    conf.set_override("origin_trackers", [], "torrent_images")
    conf.set_override("origin_advertise_addresses", [], "torrent_images")
    conf.set_override("listen_interfaces", ["0.0.0.0:6881"], "torrent_images")
    glance.add()
    publisher = Publisher(conf, glance)
    with pytest.raises(exception.ConfigError, match="origin_advertise_addresses"):
        publisher.publish(IMAGE_ID)
    assert publisher.registry.list() == [] and glance.updates == []
    assert glance.downloads == 0  # found out before reading the image


def test_magnet_that_cannot_fit_fails_before_reading(conf, glance):
    conf.set_override("origin_trackers", ["http://" + "t" * 200 + ":6969/a"], "torrent_images")
    glance.add()
    publisher = Publisher(conf, glance)
    with pytest.raises(exception.MagnetTooLong, match=IMAGE_ID):
        publisher.publish(IMAGE_ID)
    assert glance.downloads == 0 and publisher.registry.list() == []


def test_hint_defaults_to_a_specific_listen_address(conf, glance):
    conf.set_override("origin_advertise_addresses", [], "torrent_images")
    conf.set_override("listen_interfaces", ["10.0.0.7:6890"], "torrent_images")
    glance.add()
    result = Publisher(conf, glance).publish(IMAGE_ID)
    assert parse_magnet(result.magnet).peers == (("10.0.0.7", 6890),)


def test_unpublish_removes_what_publish_set(publisher, glance, tmp_path):
    glance.add()
    publisher.publish(IMAGE_ID)
    entry = publisher.registry.get(IMAGE_ID)

    result = publisher.unpublish(IMAGE_ID)

    assert result.was_published and result.glance_updated
    assert glance.removals == [
        (IMAGE_ID, ["torrent_magnet", "is_torrentable", "torrent_bound_hash"])
    ]
    assert "torrent_bound_hash" not in glance.records[IMAGE_ID]
    assert publisher.registry.list() == [] and not os.path.exists(entry.directory)
    assert read_whitelist(str(tmp_path / "whitelist.txt")) == set()
    again = publisher.unpublish(IMAGE_ID)
    assert not again.was_published and not again.glance_updated


def test_unpublish_keeps_a_torrentable_flag_the_operator_set(publisher, glance):
    glance.add(is_torrentable="true")
    publisher.publish(IMAGE_ID)
    publisher.unpublish(IMAGE_ID)
    assert glance.removals == [(IMAGE_ID, ["torrent_magnet", "torrent_bound_hash"])]
    assert glance.records[IMAGE_ID]["is_torrentable"] == "true"


def test_check_unpublishes_what_glance_no_longer_backs(publisher, glance):
    ids = [f"00000000-0000-0000-0000-00000000000{i}" for i in range(5)]
    for image_id in ids:
        glance.add(image_id)
        publisher.publish(image_id)
    deleted, replaced, deactivated, other_magnet, fine = ids
    del glance.records[deleted]
    glance.records[replaced]["os_hash_value"] = "0" * 128
    glance.records[deactivated]["status"] = "deactivated"
    glance.records[other_magnet]["torrent_magnet"] = "magnet:?xt=urn:btih:" + "1" * 40
    glance.removals.clear()

    results = {r.image_id: r for r in publisher.check()}

    assert set(results) == {deleted, replaced, deactivated, other_magnet}
    assert "deleted" in results[deleted].reason
    assert "replaced" in results[replaced].reason
    assert "deactivated" in results[deactivated].reason
    assert "no longer names" in results[other_magnet].reason
    assert [e.image_id for e in publisher.registry.list()] == [fine]
    # Only stale magnets of images that still exist are removed from Glance.
    assert sorted(i for i, _ in glance.removals) == sorted([replaced, deactivated])


def test_check_keeps_everything_when_glance_is_down(publisher, glance):
    glance.add()
    publisher.publish(IMAGE_ID)
    glance.fail_gets = True
    assert publisher.check() == []
    assert publisher.registry.get(IMAGE_ID) is not None


def test_separate_data_dir(conf, glance, tmp_path):
    conf.set_override("origin_data_dir", str(tmp_path / "data"), "torrent_images")
    glance.add()
    publisher = Publisher(conf, glance)
    publisher.publish(IMAGE_ID)
    entry = publisher.registry.get(IMAGE_ID)
    assert entry.data_path == str(tmp_path / "data" / IMAGE_ID) and entry.has_data()
    assert set(os.listdir(entry.directory)) == {"image.torrent", "meta.json"}
    publisher.unpublish(IMAGE_ID)
    assert os.listdir(tmp_path / "data") == []


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("10.0.0.2:6881", ("10.0.0.2", 6881)),
        ("[fd00::2]:6881", ("fd00::2", 6881)),
        ("glance-1.example.org:6881", ("glance-1.example.org", 6881)),
    ],
)
def test_advertise_addresses_are_host_port(conf, glance, value, expected):
    assert parse_host_port(value) == expected
    conf.set_override("origin_advertise_addresses", [value], "torrent_images")
    assert Publisher(conf, glance).advertise_peers() == [expected]


@pytest.mark.parametrize("value", ["10.0.0.2", "10.0.0.2:0", "10.0.0.2:70000", "bad host:1", ":1"])
def test_bad_advertise_address_is_a_config_error(conf, glance, value):
    with pytest.raises(ValueError):
        parse_host_port(value)
    conf.set_override("origin_advertise_addresses", [value], "torrent_images")
    with pytest.raises(exception.ConfigError, match="origin_advertise_addresses"):
        Publisher(conf, glance).advertise_peers()


def test_too_many_hints_are_dropped_not_refused(conf, glance):
    hints = [f"10.0.1.{i}:6881" for i in range(1, 21)]
    conf.set_override("origin_advertise_addresses", hints, "torrent_images")
    glance.add()
    result = Publisher(conf, glance).publish(IMAGE_ID)
    assert len(result.magnet) <= 255
    assert parse_magnet(result.magnet).peers[0] == ("10.0.1.1", 6881)
    assert "x.pe=10.0.1.20:6881" in result.dropped_from_magnet


# -- torrent formats and the bound hash --------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "v1", "v2"), [("v1", True, False), ("v2", False, True), ("hybrid", True, True)]
)
def test_format_option_decides_the_torrent_and_the_magnet(conf, glance, fmt, v1, v2):
    conf.set_override("origin_torrent_format", fmt, "torrent_images")
    record = glance.add()
    publisher = Publisher(conf, glance)

    result = publisher.publish(IMAGE_ID)

    entry = publisher.registry.get(IMAGE_ID)
    hashes = load_torrent(open(entry.torrent_path, "rb").read()).info_hashes()
    assert (hashes.has_v1(), hashes.has_v2()) == (v1, v2)
    assert entry.torrent_format == fmt
    assert (entry.info_hash_v1 is not None, entry.info_hash_v2 is not None) == (v1, v2)
    magnet = parse_magnet(result.magnet)
    assert (magnet.info_hash_v1, magnet.info_hash_v2) == (entry.info_hash_v1, entry.info_hash_v2)
    assert ("xt=urn:btih:" in result.magnet, "xt=urn:btmh:" in result.magnet) == (v1, v2)
    props = glance.records[IMAGE_ID]
    if fmt == "v2":  # bound to Glance's hash of the same read; hybrid pieces may pass on SHA-1
        assert props["torrent_bound_hash"] == (
            f"sha512:{record['os_hash_value']}:{entry.info_hash_v2}"
        )
        assert len(props["torrent_bound_hash"]) <= 255
        parsed = publisher._image_info(IMAGE_ID).bound_hash
        assert parsed.info_hash_v2 == magnet.info_hash_v2
    else:
        assert "torrent_bound_hash" not in props
    assert publisher.publish(IMAGE_ID).status == "unchanged"
    assert glance.downloads == 1 and len(glance.updates) == 1


# 163 characters quoted: a hybrid magnet must drop its name and v1 hash, a v1 one its name.
LONG_TRACKER = "http://" + "t" * 60 + "." + "t" * 59 + ".example.org:6969/announce"


def test_hybrid_magnet_that_must_shrink_keeps_the_v2_hash(conf, glance):
    conf.set_override("origin_torrent_format", "hybrid", "torrent_images")
    conf.set_override("origin_trackers", [LONG_TRACKER], "torrent_images")
    glance.add()
    result = Publisher(conf, glance).publish(IMAGE_ID)
    magnet = parse_magnet(result.magnet)
    assert magnet.info_hash_v2 and magnet.info_hash_v1 is None
    assert any(d.startswith("xt=urn:btih:") for d in result.dropped_from_magnet)


def test_v1_magnet_keeps_its_only_hash(conf, glance):
    conf.set_override("origin_torrent_format", "v1", "torrent_images")
    conf.set_override("origin_trackers", [LONG_TRACKER], "torrent_images")
    glance.add()
    result = Publisher(conf, glance).publish(IMAGE_ID)
    magnet = parse_magnet(result.magnet)
    assert magnet.info_hash_v1 and magnet.info_hash_v2 is None
    assert result.dropped_from_magnet == [f"dn={IMAGE_ID}"]


@pytest.mark.parametrize(("first", "then"), [("hybrid", "v1"), ("v1", "v2"), ("v2", "hybrid")])
def test_a_changed_format_is_a_changed_torrent(conf, glance, tmp_path, first, then):
    conf.set_override("origin_torrent_format", first, "torrent_images")
    glance.add()
    publisher = Publisher(conf, glance)
    before = publisher.publish(IMAGE_ID)
    conf.set_override("origin_torrent_format", then, "torrent_images")

    after = publisher.publish(IMAGE_ID)

    entry = publisher.registry.get(IMAGE_ID)
    assert after.status == "published" and glance.downloads == 2
    assert entry.torrent_format == then and after.magnet != before.magnet
    assert glance.records[IMAGE_ID]["torrent_magnet"] == after.magnet
    assert read_whitelist(str(tmp_path / "whitelist.txt")) == set(entry.tracker_hashes)
    bound = glance.records[IMAGE_ID].get("torrent_bound_hash")
    if then == "v2":
        assert bound.endswith(":" + entry.info_hash_v2)
    else:
        assert bound is None
    # A binding of the old torrent goes, after the new magnet is in place.
    assert glance.removals == ([(IMAGE_ID, ["torrent_bound_hash"])] if first == "v2" else [])
    assert publisher.publish(IMAGE_ID).status == "unchanged"


def test_a_lost_bound_hash_is_set_again(publisher, glance):
    glance.add()
    publisher.publish(IMAGE_ID)
    bound = glance.records[IMAGE_ID]["torrent_bound_hash"]
    glance.remove_properties(IMAGE_ID, ["torrent_bound_hash"])

    result = publisher.publish(IMAGE_ID)

    assert result.status == "updated" and glance.downloads == 1
    assert glance.updates[-1] == (IMAGE_ID, {"torrent_bound_hash": bound})


def test_no_bound_hash_for_an_md5_only_image(publisher, glance):
    glance.add(os_hash_algo=None, os_hash_value=None)  # older than Glance multihash
    result = publisher.publish(IMAGE_ID)
    assert result.info_hash_v2 and "torrent_bound_hash" not in glance.records[IMAGE_ID]


def test_unpublish_removes_the_bound_hash_as_the_others(conf, glance):
    conf.set_override("bound_hash_property", "nti_bound", "torrent_images")
    glance.add()
    publisher = Publisher(conf, glance)
    publisher.publish(IMAGE_ID)
    assert "nti_bound" in glance.records[IMAGE_ID]

    publisher.unpublish(IMAGE_ID)

    assert glance.removals == [(IMAGE_ID, ["torrent_magnet", "is_torrentable", "nti_bound"])]
    assert "nti_bound" not in glance.records[IMAGE_ID]


@pytest.mark.parametrize("fmt", ["v1", "hybrid"])
def test_unpublish_of_an_unbound_torrent_touches_no_bound_hash(conf, glance, fmt):
    conf.set_override("origin_torrent_format", fmt, "torrent_images")
    glance.add()
    publisher = Publisher(conf, glance)
    publisher.publish(IMAGE_ID)
    publisher.unpublish(IMAGE_ID)
    assert glance.removals == [(IMAGE_ID, ["torrent_magnet", "is_torrentable"])]


def test_unpublish_keeps_a_bound_hash_of_another_torrent(publisher, glance):
    glance.add()
    publisher.publish(IMAGE_ID)
    other = f"sha512:{glance.records[IMAGE_ID]['os_hash_value']}:{'e' * 64}"
    glance.records[IMAGE_ID]["torrent_bound_hash"] = other  # another node's publish

    publisher.unpublish(IMAGE_ID)

    assert glance.removals == [(IMAGE_ID, ["torrent_magnet", "is_torrentable"])]
    assert glance.records[IMAGE_ID]["torrent_bound_hash"] == other


def zone_node(tmp_path, glance, zone: str, n: int) -> Publisher:
    """An origin node of ``zone`` with its own registry, tracker and stripe servers."""
    conf = make_conf(
        origin_state_dir=str(tmp_path / f"origin-{zone}-{n}"),
        origin_zone=zone,
        origin_trackers=[f"http://10.{n}.0.1:6969/announce"],
        origin_advertise_addresses=[f"10.{n}.0.2:6881"],
        origin_stripe_advertise=[f"http://10.{n}.0.2:9480", f"http://10.{n}.0.3:9480"],
    )
    return Publisher(conf, glance)


def test_nodes_of_several_zones_write_their_own_zone_and_one_magnet_naming_every_zone(
    tmp_path, glance
):
    glance.add()
    a, b = zone_node(tmp_path, glance, "zone-a", 1), zone_node(tmp_path, glance, "zone-b", 2)
    first = a.publish(IMAGE_ID)
    # Alone, zone a's magnet names its tracker and seeder: any client finds the swarm.
    magnet = parse_magnet(first.magnet)
    assert magnet.trackers == ("http://10.1.0.1:6969/announce",)
    assert magnet.peers == (("10.1.0.2", 6881),)

    second = b.publish(IMAGE_ID)
    assert first.info_hash_v2 == second.info_hash_v2  # the same torrent on both nodes
    assert second.status == "published"  # read from Glance once per node
    magnet = parse_magnet(second.magnet)
    assert magnet.trackers == ("http://10.1.0.1:6969/announce", "http://10.2.0.1:6969/announce")
    assert magnet.peers == (("10.1.0.2", 6881), ("10.2.0.2", 6881))
    record = glance.records[IMAGE_ID]
    assert record["torrent_magnet"] == second.magnet
    assert record["torrent_zone_zone-a"] == (
        "stripes=http://10.1.0.2:9480,http://10.1.0.3:9480;"
        "trackers=http://10.1.0.1:6969/announce;peers=10.1.0.2:6881"
    )
    assert record["torrent_zone_zone-b"].startswith("stripes=http://10.2.0.2:9480")
    assert "torrent_stripes" not in record
    # Zone b's update wrote its own property and the magnet; nothing of zone a's.
    assert set(glance.updates[1][1]) == {"torrent_zone_zone-b", "torrent_magnet"}
    # Either node publishing again changes nothing: both compute the same magnet.
    assert a.publish(IMAGE_ID).status == "unchanged"
    assert b.publish(IMAGE_ID).status == "unchanged"
    assert a.check() == [] and b.check() == []
    assert len(glance.updates) == 2

    # Zone a stops serving it: its property goes, the magnet stays for zone b's hosts
    # and no longer names zone a's tracker or seeder.
    a.unpublish(IMAGE_ID)
    record = glance.records[IMAGE_ID]
    assert "torrent_zone_zone-a" not in record
    magnet = parse_magnet(record["torrent_magnet"])
    assert magnet.info_hash_v2 == first.info_hash_v2
    assert magnet.trackers == ("http://10.2.0.1:6969/announce",)
    assert magnet.peers == (("10.2.0.2", 6881),)
    b.unpublish(IMAGE_ID)
    assert "torrent_magnet" not in glance.records[IMAGE_ID]
    assert "torrent_zone_zone-b" not in glance.records[IMAGE_ID]


def test_nodes_of_two_zones_publishing_at_once_agree_on_the_magnet_at_the_next_check(
    tmp_path, glance
):
    glance.add()
    a, b = zone_node(tmp_path, glance, "zone-a", 1), zone_node(tmp_path, glance, "zone-b", 2)
    a.publish(IMAGE_ID)
    b.publish(IMAGE_ID)
    both = glance.records[IMAGE_ID]["torrent_magnet"]
    # As if zone a had read the image before zone b's properties were written, and
    # written last: its magnet names only its own zone.
    alone = a.magnet_for(a.registry.get(IMAGE_ID), {})[0]
    glance.records[IMAGE_ID]["torrent_magnet"] = alone
    assert parse_magnet(alone).trackers == ("http://10.1.0.1:6969/announce",)

    assert b.check() == []  # the seeder's periodic check
    assert glance.records[IMAGE_ID]["torrent_magnet"] == both
    assert a.check() == [] and glance.records[IMAGE_ID]["torrent_magnet"] == both


def test_a_zone_node_with_other_settings_than_its_zone_says_so(tmp_path, glance, caplog):
    glance.add()
    zone_node(tmp_path, glance, "zone-a", 1).publish(IMAGE_ID)
    other = zone_node(tmp_path, glance, "zone-a", 3)
    other.publish(IMAGE_ID)
    assert "every origin node of zone zone-a needs the same" in caplog.text
    assert glance.records[IMAGE_ID]["torrent_zone_zone-a"].startswith("stripes=http://10.3.")


@pytest.mark.parametrize(
    "overrides, option",
    [
        ({"origin_zone": "zone a"}, "origin_zone"),
        ({"origin_stripe_advertise": ["http://origin.example:9480"]}, "origin_stripe_advertise"),
        (
            {
                "origin_stripe_advertise": [],
                "origin_trackers": [],
                "origin_advertise_addresses": [],
            },
            "origin_stripe_advertise",
        ),
    ],
)
def test_zone_settings_that_no_host_could_use_fail_before_reading(
    tmp_path, glance, overrides, option
):
    glance.add()
    values = {
        "origin_state_dir": str(tmp_path / "origin"),
        "origin_zone": "zone-a",
        "origin_trackers": ["http://10.1.0.1:6969/announce"],
        "origin_stripe_advertise": ["http://10.1.0.2:9480"],
        **overrides,
    }
    with pytest.raises(exception.ConfigError, match=option):
        Publisher(make_conf(**values), glance).publish(IMAGE_ID)
    assert glance.downloads == 0 and glance.updates == []
