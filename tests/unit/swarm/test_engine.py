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

import libtorrent as lt
import pytest

from nova_torrent_images import exception
from nova_torrent_images.swarm import engine
from nova_torrent_images.testing.swarm import make_conf


def test_ip_filter_blocks_outside_allowed_cidrs():
    ipf = engine.build_ip_filter(["10.1.0.0/16", "127.0.0.0/8"])
    assert ipf.access("10.1.2.3") == 0
    assert ipf.access("127.0.0.5") == 0
    assert ipf.access("10.2.0.1") == 1
    assert ipf.access("8.8.8.8") == 1
    assert ipf.access("fd00::1") == 1
    assert engine.build_ip_filter([]) is None


def test_datacenter_profile():
    conf = make_conf(listen_interfaces=["127.0.0.9:6881"], upload_rate_limit=4096)
    settings = engine.build_settings(conf.torrent_images)
    for key in ("enable_dht", "enable_lsd", "enable_upnp", "enable_natpmp"):
        assert settings[key] is False
    assert settings["webtorrent_stun_server"] == ""
    assert settings["upload_rate_limit"] == 4096 * 1024
    assert settings["outgoing_interfaces"] == "127.0.0.9"
    wildcard = engine.build_settings(make_conf(listen_interfaces=["0.0.0.0:6881"]).torrent_images)
    assert "outgoing_interfaces" not in wildcard


def test_engine_applies_settings_and_peer_classes():
    eng = engine.SwarmEngine(
        make_conf(upload_rate_limit=100), listen_interfaces=["127.0.0.9:0"]
    ).start()
    try:
        settings = eng.session.get_settings()
        assert settings["enable_dht"] is False
        assert settings["upload_rate_limit"] == 100 * 1024
        # Rate-limit quota and a capped peer's answers come once per tick (bench/RESULTS.md).
        assert settings["tick_interval"] == engine.TICK_INTERVAL_MS < 500
        assert eng.listen_port > 0
        assert eng.session.get_ip_filter().access("8.8.8.8") == 1
    finally:
        eng.shutdown()


def test_bad_cidr_is_a_config_error():
    eng = engine.SwarmEngine(
        make_conf(allowed_peer_cidrs=["10.0.0.0/33"]), listen_interfaces=["127.0.0.9:0"]
    )
    with pytest.raises(exception.ConfigError, match="allowed_peer_cidrs"):
        eng.start()


def test_engine_not_started():
    eng = engine.SwarmEngine(make_conf())
    with pytest.raises(exception.TorrentImagesError, match="not started"):
        eng.session  # noqa: B018


def test_lt_version_is_supported():
    major, minor = (int(x) for x in lt.__version__.split(".")[:2])
    assert (major, minor) >= (2, 0)
