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

"""Prometheus metrics: values after events, the textfile, the origin's HTTP endpoint."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from types import SimpleNamespace

import prometheus_client.exposition
import pytest
from prometheus_client.parser import text_string_to_metric_families

from nova_torrent_images import exception
from nova_torrent_images.common import metrics
from nova_torrent_images.common.metrics import error_label
from nova_torrent_images.compute.metrics import Metrics
from nova_torrent_images.compute.pipeline import ImagePipeline
from nova_torrent_images.compute.sources.base import FetchResult
from nova_torrent_images.compute.stores.base import Capacity
from nova_torrent_images.compute.stores.filesystem import FilesystemStore
from nova_torrent_images.origin.metrics import OriginMetrics
from nova_torrent_images.origin.publisher import Publisher
from nova_torrent_images.origin.seeder import OriginSeeder
from nova_torrent_images.swarm.transfer import SwarmStats
from nova_torrent_images.testing.swarm import make_conf, next_loopback_address
from tests.unit.compute.test_pipeline import DATA, StubGlance, image
from tests.unit.origin.fakes import IMAGE_ID, FakeGlance


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a text exposition, keyed by (name, sorted labels)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_fetches_and_their_bytes_are_counted():
    m = Metrics()
    swarm = SwarmStats(hash_failures=2, peers_banned=1)
    m.fetch_succeeded(
        FetchResult(
            "a", "ref", "torrent", 12.0, bytes_from_peers=700, bytes_from_origin=300, swarm=swarm
        )
    )
    m.fetch_succeeded(FetchResult("b", "ref", "glance", 3.0, bytes_from_glance=1000))
    assert m.value("nti_image_bytes_total", {"source": "peers"}) == 700
    assert m.value("nti_image_bytes_total", {"source": "origin"}) == 300
    assert m.value("nti_image_bytes_total", {"source": "glance"}) == 1000
    assert m.value("nti_fetches_total", {"source": "torrent", "outcome": "ok"}) == 1
    assert m.value("nti_fetches_total", {"source": "glance", "outcome": "ok"}) == 1
    assert m.value("nti_fetch_seconds_count", {"source": "torrent"}) == 1
    assert m.value("nti_fetch_seconds_sum", {"source": "torrent"}) == 12.0
    assert m.value("nti_fetch_seconds_bucket", {"source": "glance", "le": "5.0"}) == 1
    assert m.value("nti_fetch_seconds_bucket", {"source": "glance", "le": "2.0"}) == 0
    assert m.value("nti_hash_failures_total") == 2
    assert m.value("nti_peers_banned_total") == 1
    # Another Metrics (another simulated host) has its own registry.
    assert Metrics().value("nti_image_bytes_total", {"source": "peers"}) == 0


def test_failures_and_fallbacks_are_labelled_by_class():
    m = Metrics()
    stalled = exception.TorrentStalled(image_id="a", timeout=60, percent=10.0, peers=0)
    m.fetch_failed("torrent", stalled)
    m.fallback(stalled)
    try:
        raise exception.TorrentFetchError(image_id="a", reason="bad hash") from (
            exception.IntegrityError(image_id="a", algo="sha512", expected="x", actual="y", size=1)
        )
    except exception.TorrentFetchError as exc:
        m.fallback(exc)
    m.fetch_failed("glance", OSError("disk on fire"))
    m.base_copy_hit()
    assert m.value("nti_fetches_total", {"source": "torrent", "outcome": "error"}) == 1
    assert m.value("nti_fetches_total", {"source": "glance", "outcome": "error"}) == 1
    assert m.value("nti_fetch_errors_total", {"source": "torrent", "error": "TorrentStalled"}) == 1
    assert m.value("nti_fetch_errors_total", {"source": "glance", "error": "other"}) == 1
    assert m.value("nti_fallbacks_total", {"reason": "TorrentStalled"}) == 1
    assert m.value("nti_fallbacks_total", {"reason": "IntegrityError"}) == 1
    assert m.value("nti_fallbacks_total", {"reason": "MetadataTimeout"}) == 0
    assert m.value("nti_base_copy_hits_total") == 1


def test_error_label_is_bounded():
    assert error_label(ValueError("image 1234 at 10.0.0.1 said no")) == "other"
    plain = exception.TorrentFetchError(image_id="a", reason="unexpected RuntimeError")
    plain.__cause__ = RuntimeError("libtorrent")
    assert error_label(plain) == "TorrentFetchError"
    assert error_label(exception.MetadataTimeout(image_id="a", timeout=1, peers="0")) == (
        "MetadataTimeout"
    )


def test_store_and_seed_gauges():
    m = Metrics()
    bases = [SimpleNamespace(), SimpleNamespace(), SimpleNamespace()]
    store = SimpleNamespace(
        capacity=lambda: Capacity(total=1000, free=400, ours=300), list=lambda: bases
    )
    m.observe_store(store, None)
    assert m.value("nti_store_bytes", {"kind": "ours"}) == 300
    assert m.value("nti_store_bytes", {"kind": "free"}) == 400
    assert m.value("nti_store_bytes", {"kind": "total"}) == 1000
    assert m.value("nti_base_copies") == 3 and m.value("nti_seeds") == 0
    statuses = [
        SimpleNamespace(seeding=True, bytes_up=50),
        SimpleNamespace(seeding=True, bytes_up=25),
        SimpleNamespace(seeding=False, bytes_up=0),
    ]
    m.observe_store(store, SimpleNamespace(status=lambda: statuses))
    assert m.value("nti_seeds") == 2 and m.value("nti_seed_uploaded_bytes") == 75


def test_queued_upload_gauges_count_entries_and_their_bytes():
    m = Metrics()
    m.observe_uploads([SimpleNamespace(size=300), SimpleNamespace(size=700)])
    assert m.value("nti_queued_uploads") == 2 and m.value("nti_queued_upload_bytes") == 1000
    m.observe_uploads([])  # all uploaded
    assert m.value("nti_queued_uploads") == 0 and m.value("nti_queued_upload_bytes") == 0


def test_textfile_is_replaced_atomically_and_parses(tmp_path, monkeypatch):
    m = Metrics()
    m.fetch_succeeded(FetchResult("b", "ref", "glance", 3.0, bytes_from_glance=1000))
    path = str(tmp_path / "nova_torrent_images.prom")
    m.write_textfile(path)
    first = samples(open(path).read())
    assert first[("nti_image_bytes_total", (("source", "glance"),))] == 1000
    inode = os.stat(path).st_ino
    m.base_copy_hit()
    m.write_textfile(path)
    assert os.stat(path).st_ino != inode  # a new file renamed over the old one
    assert samples(open(path).read())[("nti_base_copy_hits_total", ())] == 1
    assert os.listdir(tmp_path) == ["nova_torrent_images.prom"]

    def broken(*args, **kwargs):
        raise RuntimeError("collector failed")

    monkeypatch.setattr(prometheus_client.exposition, "generate_latest", broken)
    before = open(path).read()
    with pytest.raises(RuntimeError):
        m.write_textfile(path)
    assert open(path).read() == before  # the old file whole, no temporary left
    assert os.listdir(tmp_path) == ["nova_torrent_images.prom"]


def test_pipeline_writes_the_textfile_after_requests_and_maintenance(tmp_path):
    path = tmp_path / "metrics" / "nti.prom"
    path.parent.mkdir()
    conf = make_conf(mode="none", metrics_textfile=str(path))
    m = Metrics()
    pipeline = ImagePipeline(conf, FilesystemStore(str(tmp_path / "cache")), metrics=m)
    try:
        pipeline.ensure_base(image(), StubGlance(DATA))
        got = samples(path.read_text())
        assert got[("nti_image_bytes_total", (("source", "glance"),))] == len(DATA)
        assert got[("nti_fetches_total", (("outcome", "ok"), ("source", "glance")))] == 1
        assert got[("nti_base_copies", ())] == 1
        assert got[("nti_store_bytes", (("kind", "ours"),))] >= len(DATA)
        assert got[("nti_seeds", ())] == 0  # from Glance: no torrent metadata to seed
        pipeline.ensure_base(image(), StubGlance(DATA))  # the base copy is there now
        assert samples(path.read_text())[("nti_base_copy_hits_total", ())] == 1
        path.unlink()
        pipeline.maintenance.run_once()
        assert samples(path.read_text())[("nti_base_copies", ())] == 1
    finally:
        pipeline.shutdown()


def test_command_line_pipelines_write_no_textfile(tmp_path):
    path = tmp_path / "nti.prom"
    conf = make_conf(mode="none", metrics_textfile=str(path))
    pipeline = ImagePipeline(
        conf, FilesystemStore(str(tmp_path / "cache")), seeding=False, metrics=Metrics()
    )
    pipeline.ensure_base(image(), StubGlance(DATA))
    assert not path.exists()  # nova-compute's file is not overwritten by a CLI tool


def test_unwritable_textfile_never_fails_a_fetch(tmp_path, caplog):
    path = tmp_path / "missing-dir" / "nti.prom"
    conf = make_conf(mode="none", metrics_textfile=str(path))
    pipeline = ImagePipeline(conf, FilesystemStore(str(tmp_path / "cache")), metrics=Metrics())
    try:
        delivery = pipeline.ensure_base(image(), StubGlance(DATA))
    finally:
        pipeline.shutdown()
    assert delivery.downloaded and "metrics_textfile" in caplog.text


@pytest.fixture
def publisher(tmp_path):
    conf = make_conf(
        origin_state_dir=str(tmp_path / "origin"),
        origin_advertise_addresses=["127.0.0.1:6881"],
        listen_interfaces=[f"{next_loopback_address()}:0"],
    )
    glance = FakeGlance()
    glance.add(IMAGE_ID)
    publisher = Publisher(conf, glance)
    publisher.publish(IMAGE_ID)
    return publisher


def test_origin_serves_metrics_on_its_address_and_stops(publisher):
    address = next_loopback_address()
    publisher.conf.set_override("origin_metrics_listen", f"{address}:0", "torrent_images")
    seeder = OriginSeeder(publisher.conf, publisher=publisher).start()
    try:
        host, port = seeder.metrics.endpoint
        assert host == address and port
        url = f"http://{address}:{port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            got = samples(response.read().decode())
        assert got[("nti_origin_images", ())] == 1
        assert got[("nti_origin_peers", ())] == 0
        assert got[("nti_origin_uploaded_bytes_total", ())] == 0
        assert not any(name.startswith("nti_image") for name, _ in got)  # origin only
    finally:
        seeder.stop()
    assert seeder.metrics.endpoint is None
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=2)


def test_origin_without_the_option_serves_nothing(publisher):
    seeder = OriginSeeder(publisher.conf, publisher=publisher).start()
    try:
        assert seeder.metrics.endpoint is None
    finally:
        seeder.stop()


@pytest.mark.parametrize("value", ["9100", "127.0.0.1", "127.0.0.1:99999", "a b:80"])
def test_bad_origin_metrics_listen_names_the_option(value):
    with pytest.raises(exception.ConfigError, match="origin_metrics_listen"):
        metrics.parse_listen(value)


def test_origin_metrics_listen_in_use_is_a_config_error():
    address = next_loopback_address()
    first = OriginMetrics(SimpleNamespace(stats=list, uploaded_bytes=lambda: 0))
    second = OriginMetrics(SimpleNamespace(stats=list, uploaded_bytes=lambda: 0))
    _, port = first.serve(f"{address}:0")
    try:
        with pytest.raises(exception.ConfigError, match="origin_metrics_listen"):
            second.serve(f"{address}:{port}")
    finally:
        first.stop()
        second.stop()
