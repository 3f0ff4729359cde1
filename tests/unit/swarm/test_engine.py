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

import time

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


def test_no_alert_per_block():
    # Two alerts per 16 KiB block cost the pump about half a CPU-second per GiB.
    settings = engine.build_settings(make_conf().torrent_images)
    assert not settings["alert_mask"] & int(lt.alert_category.block_progress)
    assert settings["alert_mask"] & int(lt.alert_category.peer)  # peer_ban_alert
    assert settings["alert_mask"] & int(lt.alert_category.storage)  # file errors, flushes


class _Peer:
    def __init__(self, ip: str, port: int, total_download: int) -> None:
        self.ip = (ip, port)
        self.total_download = total_download


A, B, C = ("10.0.0.1", 6881), ("10.0.0.2", 6881), ("10.0.0.3", 6881)


def _poll(ledger: engine.PeerBytes, **counts: int) -> None:
    names = {"a": A, "b": B, "c": C}
    ledger.update([_Peer(*names[k], n) for k, n in counts.items()])


def test_peer_bytes_connected_peers_are_exact():
    ledger = engine.PeerBytes()
    _poll(ledger, a=100, b=50)
    _poll(ledger, a=300, b=200)
    assert ledger.totals(500) == {A: 300, B: 200}


def test_peer_bytes_unseen_tail_goes_to_the_peers_that_left():
    ledger = engine.PeerBytes()
    _poll(ledger, a=100, b=100, c=100)
    _poll(ledger, a=200, b=400, c=200)  # B delivered 300 in its last interval, C 100
    _poll(ledger, a=600)  # B and C closed; what they sent after the last poll is unseen
    totals = ledger.totals(600 + 400 + 200 + 400)  # the torrent received 400 bytes more
    assert totals == {A: 600, B: 400 + 300, C: 200 + 100}
    assert sum(totals.values()) == 1600


def test_peer_bytes_a_surplus_is_taken_from_everyone():
    ledger = engine.PeerBytes()
    _poll(ledger, a=3000, b=1000)  # 4000 polled, the torrent counted 3600
    totals = ledger.totals(3600)
    assert totals == {A: 2700, B: 900}


def test_peer_bytes_reconnection_keeps_the_first_connection():
    ledger = engine.PeerBytes()
    _poll(ledger, a=500)
    _poll(ledger, a=40)  # a new connection from the same endpoint starts at 0
    _poll(ledger, a=100)
    assert ledger.totals(600) == {A: 600}


def test_peer_bytes_no_peer_sent_anything():
    ledger = engine.PeerBytes()
    _poll(ledger, a=0)
    assert ledger.totals(0) == {}
    assert ledger.totals(1000) == {}  # from no polled peer: none named


class _CountingSession:
    """The engine's session with its pop_alerts calls counted."""

    def __init__(self, session: lt.session) -> None:
        self._session = session
        self.pops = 0

    def pop_alerts(self) -> list:
        self.pops += 1
        return self._session.pop_alerts()

    def __getattr__(self, name: str) -> object:
        return getattr(self._session, name)


def test_idle_pump_backs_off_and_a_waiter_wakes_it():
    eng = engine.SwarmEngine(make_conf(), listen_interfaces=["127.0.0.9:0"]).start()
    try:
        real = eng.session
        counting = _CountingSession(real)
        eng._session = counting
        time.sleep(1.0)  # start-up alerts popped; then idle
        counting.pops = 0
        time.sleep(1.0)
        idle_pops = counting.pops
        assert idle_pops <= 1.0 / engine.PUMP_IDLE_INTERVAL + 3, idle_pops  # not 100 a second

        params = lt.parse_magnet_uri("magnet:?xt=urn:btih:" + "ab" * 20)
        params.save_path = "/nonexistent"
        params.flags |= lt.torrent_flags.upload_mode | lt.torrent_flags.paused
        watch = eng.add_torrent(params, "test")
        counting.pops = 0
        started = time.monotonic()
        with eng._awaited():
            time.sleep(0.5)
            awaited_pops = counting.pops
        eng.remove_torrent(watch, timeout=5)
        took = time.monotonic() - started - 0.5
        # While somebody waits the pump polls at full rate (every PUMP_INTERVAL).
        assert awaited_pops >= 0.5 / engine.PUMP_IDLE_INTERVAL * 2, awaited_pops
        assert took < 2.0
    finally:
        eng._session = real
        eng.shutdown()
