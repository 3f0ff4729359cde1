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

"""Local seeds that last: restart recovery, quota eviction, throttling, operator CLI."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

import pytest

from nova_torrent_images.compute.pipeline import ImagePipeline, fetch_to_file
from nova_torrent_images.compute.stores.filesystem import FilesystemStore

MiB = 1024 * 1024


def sha512_of(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha512").hexdigest()


def local_host(hosts, tmp_path, name, **conf):
    host = hosts(name, state_dir=str(tmp_path / name), **conf)
    store = FilesystemStore(str(tmp_path / name / "images"))
    local = ImagePipeline(host.conf, store, engine=host.engine)
    local.start()
    return host, local


def test_restart_resumes_seeding_without_recheck(make_image, hosts, glance, tmp_path):
    image = make_image(256 * MiB)
    origin = hosts("origin")
    origin.seed(image.torrent.data, image.path)
    image.set_magnet(peers=[origin.endpoint])
    host_a, local_a = local_host(hosts, tmp_path, "host-a")
    info = glance.image_info(image.id)
    delivery = local_a.ensure_base(info, glance)
    base, downloaded = delivery.base, delivery.downloaded
    assert downloaded and local_a.seeds.seeding() == [image.id]
    assert sha512_of(base.ref) == image.record["os_hash_value"]

    # The process holding A's store restarts; the origin is gone by then.
    local_a.shutdown()
    address = host_a.address
    host_a.stop()
    origin.stop()
    restarted = hosts("host-a-restarted", address=address, state_dir=str(tmp_path / "host-a"))
    started = time.monotonic()
    local = ImagePipeline(
        restarted.conf,
        FilesystemStore(str(tmp_path / "host-a" / "images")),
        engine=restarted.engine,
    )
    local.start()
    restart_seconds = time.monotonic() - started
    started = time.monotonic()
    with open(base.ref, "rb") as f:
        hashlib.file_digest(f, "sha1")  # what a full recheck would at least cost
    hash_seconds = time.monotonic() - started
    print(
        f"\nrestart of a 256 MiB base copy: {restart_seconds:.3f}s; hashing it: {hash_seconds:.3f}s"
    )
    assert local.seeds.seeding() == [image.id]
    assert restart_seconds < hash_seconds / 2

    # A host that knows only A fetches everything from A's resumed seed.
    host_c = hosts("host-c")
    image.set_magnet(peers=[restarted.endpoint])
    dest = str(tmp_path / "c.raw")
    result = fetch_to_file(
        glance.image_info(image.id), dest, conf=host_c.conf, glance=None, engine=host_c.engine
    )
    assert result.source == "torrent"
    assert sha512_of(dest) == image.record["os_hash_value"]
    local.shutdown()


def test_quota_evicts_least_recently_used_unused_base_copy(make_image, hosts, glance, tmp_path):
    images = [make_image(8 * MiB, name=f"img-{i}") for i in range(3)]
    host, local = local_host(hosts, tmp_path, "host", mode="none", store_quota=20)
    first = local.ensure_base(glance.image_info(images[0].id), glance).base
    local.store.clone(first, "vm-1")  # an instance uses the first image
    time.sleep(0.01)
    local.ensure_base(glance.image_info(images[1].id), glance)
    # make the in-use base copy the least recently used one
    os.utime(first.ref)
    first_tags = local.store.lookup(images[0].id)
    local.store._update_tags(first_tags, last_used=time.time() - 3600)

    local.ensure_base(glance.image_info(images[2].id), glance)

    kept = {b.image_id for b in local.store.list()}
    assert kept == {images[0].id, images[2].id}
    assert local.store.capacity().ours <= 20 * MiB


def test_upload_limit_applies_to_datacenter_peers(make_image, hosts, glance, tmp_path):
    image = make_image(24 * MiB)
    seeder = hosts("seeder", upload_rate_limit=4096)
    seeder.seed(image.torrent.data, image.path)
    image.set_magnet(peers=[seeder.endpoint])
    peer = hosts("peer")
    result = fetch_to_file(
        glance.image_info(image.id),
        str(tmp_path / "x"),
        conf=peer.conf,
        glance=None,
        engine=peer.engine,
    )
    rate = 24 * MiB / result.swarm.seconds
    print(f"\nrate from a seeder limited to 4 MiB/s: {rate / MiB:.2f} MiB/s")
    assert result.source == "torrent"
    assert rate <= 1.2 * 4 * MiB
    assert rate >= 0.5 * 4 * MiB  # it really came from the limited seeder


def run_cli(config: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nova_torrent_images.cmd.main", "--config-file", config, *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture
def cli_config(tmp_path, glance_server):
    path = tmp_path / "nova-torrent-images.conf"
    path.write_text(
        "[torrent_images]\n"
        "store = filesystem\n"
        f"state_dir = {tmp_path / 'state'}\n"
        f"glance_endpoint = {glance_server.url}\n"
        "glance_noauth = true\n"
        "listen_interfaces = 127.0.0.250:0\n"
    )
    return str(path)


def test_cli_verbs_against_a_real_store(make_image, cli_config, tmp_path):
    image = make_image(4 * MiB)
    fetched = run_cli(cli_config, "fetch", "--quiet", image.id)
    assert fetched.returncode == 0, fetched.stderr
    assert "verified" in fetched.stdout

    status = run_cli(cli_config, "status", "--format", "json")
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    (entry,) = data["base_copies"]
    assert entry["image_id"] == image.id and entry["size"] == 4 * MiB
    assert entry["source"] == "glance"  # no magnet: status says where it came from
    assert sha512_of(entry["ref"]) == image.record["os_hash_value"]
    assert "last used" in run_cli(cli_config, "status").stdout

    pruned = run_cli(cli_config, "prune", "--dry-run")
    assert pruned.returncode == 0 and "nothing to prune" in pruned.stdout

    evicted = run_cli(cli_config, "evict", image.id)
    assert evicted.returncode == 0, evicted.stderr
    assert not os.path.exists(entry["ref"])

    unknown = run_cli(cli_config, "evict", "no-such-image")
    assert unknown.returncode != 0
    assert unknown.stderr.strip().count("\n") == 0 and "no-such-image" in unknown.stderr

    bare = tmp_path / "bare.conf"
    bare.write_text("[torrent_images]\n")
    unconfigured = run_cli(str(bare), "status")
    assert unconfigured.returncode != 0
    assert unconfigured.stderr.strip().count("\n") == 0
    assert "[torrent_images] store" in unconfigured.stderr


def test_host_keeps_serving_after_the_origin_stops(make_image, hosts, glance, tmp_path, tracker):
    from nova_torrent_images.origin.tracker import tracker_hashes, write_whitelist

    image = make_image(32 * MiB)
    write_whitelist(
        tracker.whitelist_path,
        tracker_hashes(image.torrent.info_hash_v1, image.torrent.info_hash_v2),
    )
    os.kill(tracker.pid, 1)  # SIGHUP: opentracker rereads its whitelist
    tracker.wait_allowed(image.torrent.info_hash_v1)
    origin = hosts("origin")
    origin.seed(image.torrent.data, image.path, trackers=[tracker.announce_url])
    image.set_magnet(peers=[origin.endpoint], trackers=[tracker.announce_url])
    host_a, local_a = local_host(hosts, tmp_path, "host-a")
    delivery = local_a.ensure_base(glance.image_info(image.id), glance)
    assert delivery.downloaded and local_a.seeds.seeding() == [image.id]

    origin.stop()  # the origin is gone; only the tracker and host A remain
    host_b = hosts("host-b", stall_timeout=30, metadata_timeout=30)
    dest = str(tmp_path / "b.raw")
    result = fetch_to_file(
        glance.image_info(image.id), dest, conf=host_b.conf, glance=None, engine=host_b.engine
    )

    assert result.source == "torrent"
    assert sha512_of(dest) == image.record["os_hash_value"]
    assert set(result.swarm.per_peer) == {f"{host_a.address}:{host_a.engine.listen_port}"}
    local_a.shutdown()


def test_rejoining_a_hybrid_torrent_by_btih_after_seeding_it(make_image, hosts, glance, tmp_path):
    """A v1-only magnet of a hybrid torrent works again on a host that seeded it.

    Regression: the origin refused the host's second connection while it still counted
    the first, and the join timed out; and a download of a torrent the process seeds took
    over (then removed) the seed.
    """
    from nova_torrent_images import exception
    from nova_torrent_images.glance.image import parse_image

    image = make_image(8 * MiB)
    origin = hosts("origin")
    origin.seed(image.torrent.data, image.path)
    btih_only = image.torrent.magnet(peers=[origin.endpoint], max_length=None).replace(
        f"&xt=urn:btmh:1220{image.torrent.info_hash_v2}", ""
    )
    assert "btmh" not in btih_only
    record = {**glance.get_image(image.id), "torrent_magnet": btih_only, "is_torrentable": "true"}
    info = parse_image(record)
    host, local = local_host(hosts, tmp_path, "host", metadata_timeout=10)
    assert local.ensure_base(info, None).fetch.source == "torrent"
    assert local.seeds.seeding() == [image.id]

    # The same process cannot download what it seeds; the seed must survive the attempt.
    with pytest.raises(exception.TorrentFetchError, match="already"):
        fetch_to_file(
            info, str(tmp_path / "dup.raw"), conf=host.conf, glance=None, engine=host.engine
        )
    assert local.seeds.seeding() == [image.id]

    local.shutdown()  # seeding stops; the base copy stays
    started = time.monotonic()
    result = fetch_to_file(
        info, str(tmp_path / "again.raw"), conf=host.conf, glance=None, engine=host.engine
    )
    assert result.source == "torrent" and time.monotonic() - started < 5
    assert sha512_of(str(tmp_path / "again.raw")) == image.record["os_hash_value"]
