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

"""The pipeline without a swarm: the Glance path must never hand on bad bytes."""

import hashlib
import os
import time

import pytest

from nova_torrent_images import exception
from nova_torrent_images.compute.metrics import get_metrics
from nova_torrent_images.compute.pipeline import fetch_to_file
from nova_torrent_images.glance.client import GlanceClient
from nova_torrent_images.testing.images import image_info
from nova_torrent_images.testing.swarm import make_conf

DATA = os.urandom(300_000)


class StubGlance(GlanceClient):
    """Serves fixed bytes in chunks, the way glanceclient's iterator does."""

    def __init__(self, body: bytes) -> None:
        super().__init__(client=None)
        self.body = body
        self.calls = 0

    def iter_data(self, image_id):
        self.calls += 1
        return (self.body[i : i + 65536] for i in range(0, len(self.body), 65536))


def image(**props):
    return image_info(DATA, **props)


def test_glance_path_verifies(tmp_path):
    dest = tmp_path / "img"
    result = fetch_to_file(image(), str(dest), conf=make_conf(), glance=StubGlance(DATA))
    assert result.source == "glance" and dest.read_bytes() == DATA


@pytest.mark.parametrize("body", [DATA[:-1] + bytes([DATA[-1] ^ 1]), DATA[:-10], DATA + b"extra"])
def test_glance_corruption_is_never_handed_on(tmp_path, body):
    dest = tmp_path / "img"
    with pytest.raises(exception.IntegrityError, match="img-1"):
        fetch_to_file(image(), str(dest), conf=make_conf(), glance=StubGlance(body))
    assert os.listdir(tmp_path) == []  # no final file, no partial one


def test_existing_destination_is_not_overwritten(tmp_path):
    dest = tmp_path / "img"
    dest.write_bytes(b"something the host already had")
    with pytest.raises(exception.StoreError, match="refusing to overwrite"):
        fetch_to_file(image(), str(dest), conf=make_conf(), glance=StubGlance(DATA))
    assert dest.read_bytes() == b"something the host already had"


def test_bad_magnet_falls_to_glance_with_a_warning(tmp_path, caplog):
    glance = StubGlance(DATA)
    img = image(is_torrentable="true", torrent_magnet="magnet:?xt=urn:btih:nothex")
    result = fetch_to_file(img, str(tmp_path / "img"), conf=make_conf(), glance=glance)
    assert result.source == "glance" and glance.calls == 1
    assert any(
        "torrent_magnet" in r.getMessage() and "img-1" in r.getMessage() for r in caplog.records
    )


def test_no_glance_and_no_torrent_is_a_clear_error(tmp_path):
    with pytest.raises(exception.NotTorrentable, match="img-1"):
        fetch_to_file(image(), str(tmp_path / "img"), conf=make_conf(), glance=None)
    assert os.listdir(tmp_path) == []


def test_glance_fetch_is_counted_in_the_process_metrics(tmp_path):
    m = get_metrics()
    glance_bytes = {"source": "glance"}
    ok = {"source": "glance", "outcome": "ok"}
    before = m.value("nti_image_bytes_total", glance_bytes), m.value("nti_fetches_total", ok)
    conf = make_conf(mode="none")
    fetch_to_file(image(), str(tmp_path / "img"), conf=conf, glance=StubGlance(DATA))
    assert m.value("nti_image_bytes_total", glance_bytes) == before[0] + len(DATA)
    assert m.value("nti_fetches_total", ok) == before[1] + 1


def test_a_base_copy_is_not_evicted_between_finding_and_using_it(tmp_path):
    """Two images, room for one: a boot cloning image A while image B downloads."""
    import threading

    from nova_torrent_images.compute.pipeline import ImagePipeline
    from nova_torrent_images.compute.stores.filesystem import FilesystemStore

    data_a, data_b = os.urandom(600_000), os.urandom(600_000)
    image_a, image_b = image_info(data_a, "img-a"), image_info(data_b, "img-b")
    conf = make_conf(state_dir=str(tmp_path / "state"), mode="none", store_quota=1)
    store = FilesystemStore(str(tmp_path / "images"))
    pipeline = ImagePipeline(conf, store, seeding=False)
    pipeline.ensure_base(image_a, StubGlance(data_a))
    cloning, release = threading.Event(), threading.Event()

    def slow_clone(base):
        cloning.set()
        release.wait(10)  # the boot is between finding the base copy and cloning it
        return store.clone(base, "vm-a")

    booted = {}
    boot_a = threading.Thread(
        target=lambda: booted.update(
            a=pipeline.ensure_base(image_a, StubGlance(b""), use=slow_clone).used
        )
    )
    boot_a.start()
    assert cloning.wait(10)
    # Image B needs room; the quota (1 MiB) holds one image: A is the LRU candidate.
    pipeline.ensure_base(image_b, StubGlance(data_b))
    release.set()
    boot_a.join(10)

    with open(booted["a"], "rb") as f:
        assert hashlib.sha512(f.read()).hexdigest() == hashlib.sha512(data_a).hexdigest()
    assert store.lookup("img-a") is not None  # kept: a boot held it


def test_under_quota_pressure_a_host_keeps_its_popular_image_and_evicts_a_one_off(tmp_path):
    """Eviction weighs recent use (eviction_usage_window), not only the last use."""
    import argparse
    import contextlib
    import io
    import json

    from nova_torrent_images.cmd.local import cmd_status
    from nova_torrent_images.compute.pipeline import ImagePipeline
    from nova_torrent_images.compute.stores.filesystem import FilesystemStore

    blobs = {name: os.urandom(400_000) for name in ("popular", "one-off", "new")}
    images = {name: image_info(data, name) for name, data in blobs.items()}
    # 1 MiB holds two of the three images.
    state, cache = str(tmp_path / "state"), str(tmp_path / "images")
    conf = make_conf(
        state_dir=state, image_cache_dir=cache, mode="none", store_quota=1, store="filesystem"
    )
    store = FilesystemStore(cache)
    pipeline = ImagePipeline(conf, store, seeding=False)
    for vm in range(5):  # most instances of this host came from "popular"
        pipeline.ensure_base(
            images["popular"],
            StubGlance(blobs["popular"]),
            use=lambda base, vm=vm: store.clone(base, f"vm-{vm}"),
        )
    time.sleep(0.01)
    pipeline.ensure_base(images["one-off"], StubGlance(blobs["one-off"]))  # used more recently
    for vm in range(5):  # the instances are deleted: both base copies are unused now
        os.unlink(os.path.join(cache, "instances", f"vm-{vm}"))
    assert not store.lookup("popular").in_use and not store.lookup("one-off").in_use
    assert store.lookup("popular").last_used < store.lookup("one-off").last_used

    pipeline.ensure_base(images["new"], StubGlance(blobs["new"]))  # needs room

    # Least recently used alone would have evicted "popular"; its weight keeps it.
    assert store.lookup("popular") is not None
    assert store.lookup("one-off") is None
    assert store.lookup("new") is not None
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cmd_status(argparse.Namespace(format="json"), conf)
    weights = {row["image_id"]: row["weight"] for row in json.loads(out.getvalue())["base_copies"]}
    assert weights == {"popular": 5, "new": 1}
