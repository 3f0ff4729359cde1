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

"""A lone host lands the origin's stripes itself; a host that joins still gets them.

Real origin node (publisher, seeder, stripe server), real libtorrent hosts on their own
127.0.0.x addresses, a Glance-like origin.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest

from nova_torrent_images.compute.pipeline import ImagePipeline, fetch_to_file
from nova_torrent_images.compute.stores import open_store
from nova_torrent_images.testing.swarm import SimulatedHost
from tests.integration.test_stripes import CAP, published, sha512_of  # noqa: F401
from tests.integration.test_xenapi import xenserver  # noqa: F401

MiB = 1024 * 1024


@pytest.mark.parametrize("trusted", [False, True], ids=["whole-image-hash", "trusted-root"])
def test_a_lone_host_lands_every_stripe_itself(published, tmp_path, trusted):  # noqa: F811
    glance, image, node, _ = published
    with SimulatedHost("lone", trust_torrent_root=trusted) as host:
        result = fetch_to_file(
            image, str(tmp_path / "fetched.raw"), conf=host.conf, glance=glance, engine=host.engine
        )
    assert result.source == "torrent"
    # Every byte came from the stripes and was written by this host, not libtorrent.
    assert result.swarm.bytes_landed == image.size == result.swarm.bytes_from_stripes
    assert result.bytes_from_peers == 0 and result.swarm.hash_failures == 0
    assert sha512_of(str(tmp_path / "fetched.raw")) == image.hash_value


def test_a_lone_host_keeps_its_download_cap_on_the_stripes(published, tmp_path):  # noqa: F811
    """Every byte of a lone host comes as stripes, past libtorrent's limiter: the host's
    download_rate_limit holds for them too (the origin here sends 16 MiB/s)."""
    glance, image, node, _ = published
    cap = 8 * MiB
    with SimulatedHost("capped", download_rate_limit=cap // 1024) as host:
        started = time.monotonic()
        result = fetch_to_file(
            image, str(tmp_path / "fetched.raw"), conf=host.conf, glance=glance, engine=host.engine
        )
        seconds = time.monotonic() - started
    assert result.source == "torrent"
    assert result.swarm.bytes_landed == image.size == result.swarm.bytes_from_stripes
    # The first read of each of the 3 streams is booked at once; the rest keeps to the cap.
    assert seconds >= (image.size - 3 * MiB) / cap, seconds
    assert sha512_of(str(tmp_path / "fetched.raw")) == image.hash_value


def test_a_landed_base_copy_is_seeded_to_the_next_host(published, tmp_path):  # noqa: F811
    glance, image, node, _ = published
    first = SimulatedHost("first", image_cache_dir=str(tmp_path / "cache-first"))
    second = SimulatedHost("second", use_origin_stripes=False)
    try:
        pipeline = ImagePipeline(
            first.conf, open_store(first.conf, "filesystem"), engine=first.engine
        )
        delivery = pipeline.ensure_base(image, glance)
        assert delivery.fetch.swarm.bytes_landed == image.size
        node.stop()  # from now on only the first host has the image
        first_key = first.peer_key
        only_first = dataclasses.replace(
            image, magnet=dataclasses.replace(image.magnet, peers=(first.endpoint,))
        )
        result = fetch_to_file(
            only_first,
            str(tmp_path / "second.raw"),
            conf=second.conf,
            glance=None,
            engine=second.engine,
        )
        pipeline.shutdown()
    finally:
        first.stop()
        second.stop()
    # Seed mode served pieces libtorrent never saw written: checked on the way out. (The
    # first host is the magnet's peer hint here, so its bytes count as the origin's.)
    assert result.swarm.per_peer == {first_key: image.size}
    assert sha512_of(str(tmp_path / "second.raw")) == image.hash_value


def test_a_host_that_joins_gets_the_landed_pieces_by_bittorrent(published, tmp_path):  # noqa: F811
    glance, image, node, glance_origin = published
    early = SimulatedHost("early", download_rate_limit=CAP // 1024)
    late = SimulatedHost("late", download_rate_limit=CAP // 1024)
    results, errors = {}, []
    started = threading.Event()

    def fetch(host, name):
        def progress(done, total, rate, peers):
            if done >= total // 4:
                started.set()

        try:
            results[name] = fetch_to_file(
                image,
                str(tmp_path / f"{name}.raw"),
                conf=host.conf,
                glance=glance,
                engine=host.engine,
                progress=progress if name == "early" else None,
            )
        except Exception as exc:  # noqa: BLE001  reported below
            errors.append(exc)

    try:
        before, served = node.seeder.uploaded_bytes(), glance_origin.bytes_served
        first = threading.Thread(target=fetch, args=(early, "early"))
        first.start()
        assert started.wait(30)
        second = threading.Thread(target=fetch, args=(late, "late"))
        second.start()
        first.join()
        second.join()
        egress = node.seeder.uploaded_bytes() - before + glance_origin.bytes_served - served
    finally:
        early.stop()
        late.stop()
    assert not errors, errors
    landed = results["early"].swarm.bytes_landed
    assert 0 < landed < image.size  # it landed while alone, then stopped
    # The late host got what the early one had landed from it, not from the origin again.
    assert results["late"].bytes_from_peers >= landed
    assert egress <= 1.1 * image.size, f"origin sent {egress / image.size:.2f} copies"
    for name in ("early", "late"):
        assert sha512_of(str(tmp_path / f"{name}.raw")) == image.hash_value


def test_a_lone_xenapi_host_lands_the_stripes_in_its_vdi(published, xenserver, tmp_path):  # noqa: F811
    from nova_torrent_images.virt.xenapi.handler import TorrentImageHandler
    from tests.integration.test_xenapi import make_handler, our_vdis, vdi_sha512

    glance, image, node, _ = published
    fake, session = xenserver
    with SimulatedHost("xen-compute") as compute:
        handler = make_handler(TorrentImageHandler, compute, glance, fake, tmp_path)
        root = handler.download_image(None, session, {"name": "vm-1"}, image.id)["root"]["uuid"]
        fetched = handler.pipeline(session).fetches[image.id]
        handler.shutdown()
    # Written into the VDI's device by this host (a loop device when run as root).
    assert fetched.swarm.bytes_landed == image.size
    assert vdi_sha512(fake, root, image.size) == image.hash_value
    assert len(our_vdis(fake, "base")) == 1 and not our_vdis(fake, "slot")


@pytest.mark.parametrize("trusted", [False, True], ids=["whole-image-hash", "trusted-root"])
def test_a_corrupt_stripe_never_reaches_the_base_copy(published, tmp_path, trusted):  # noqa: F811
    glance, image, node, _ = published
    entry = node.publisher.registry.get(image.id)
    with open(entry.data_path, "r+b") as f:  # the origin's copy rots after publishing
        f.seek(5 * MiB + 123)
        byte = f.read(1)
        f.seek(5 * MiB + 123)
        f.write(bytes([byte[0] ^ 0xFF]))
    with SimulatedHost(
        "lone",
        trust_torrent_root=trusted,
        stall_timeout=4,
        image_cache_dir=str(tmp_path / "cache"),
    ) as host:
        pipeline = ImagePipeline(host.conf, open_store(host.conf, "filesystem"), engine=host.engine)
        delivery = pipeline.ensure_base(image, glance)
        pipeline.shutdown()
    # The piece's v2 root (or the whole-image hash) caught the corrupt stripe. Either the
    # swarm stalled on that piece and Glance filled in only what was missing (the stripe
    # refused, the rest kept), or the swarm path failed and the verified Glance download
    # took over: both end with Glance's bytes.
    fetch = delivery.fetch
    assert fetch.fallback_reason
    if fetch.source == "torrent":
        assert 0 < fetch.bytes_from_glance < image.size and fetch.swarm.hash_failures >= 1
    else:
        assert fetch.source == "glance"
    assert sha512_of(delivery.base.ref) == image.hash_value
