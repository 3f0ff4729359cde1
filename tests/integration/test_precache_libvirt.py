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

"""Rollout before a launch: Nova's own pre-cache (``openstack aggregate cache image``).

Two libvirt compute hosts, each a ``nova-torrent-compute`` child process (the launcher's
real ``main()``, see nova_compute_child.py), run Nova's ``LibvirtDriver.cache_image`` for a
torrentable image, as ``ComputeManager.cache_images`` does: through this library's hook,
into Nova's image cache, with a verified base copy that each host seeds. The second host
takes most of its bytes from the first, and a later ``cache_image`` on either host finds
the image cached without asking Glance.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

import pytest

pytest.importorskip("nova")

from nova_torrent_images.testing.swarm import next_loopback_address

MiB = 1024 * 1024
CHILD = os.path.join(os.path.dirname(__file__), "nova_compute_child.py")
ORIGIN_KIB = 2 * 1024  # the origin seeder's uplink: a host's peer is faster


def glance_gets(glance_server, image_id: str) -> int:
    """Requests glance-api served about ``image_id`` (record or data), from its access log."""
    needle = f"/v2/images/{image_id}"
    with open(glance_server.access_log_path) as f:
        return sum(needle in line for line in f)


def start_host(tmp_path, glance_server, image_id: str, name: str) -> tuple[subprocess.Popen, str]:
    root = tmp_path / name
    (root / "instances" / "_base").mkdir(parents=True)
    config = root / "nova.conf"
    config.write_text(
        "[DEFAULT]\n"
        f"instances_path = {root / 'instances'}\n"
        f"state_path = {root}\n"
        "[glance]\n"
        f"endpoint_override = {glance_server.url}\n"
        "num_retries = 0\n"
        "[oslo_concurrency]\n"
        f"lock_path = {root / 'locks'}\n"
        "[torrent_images]\n"
        f"state_dir = {root / 'state'}\n"
        f"image_cache_dir = {root / 'state' / 'images'}\n"
        f"listen_interfaces = {next_loopback_address()}:0\n"
        "min_announce_interval = 1\n"
        "metadata_timeout = 30\n"
    )
    report = str(root / "report.json")
    env = {k: v for k, v in os.environ.items() if k != "OS_NOVA_DISABLE_EVENTLET_PATCHING"}
    env.update(
        NTI_CHILD_MODE="cache_image",
        NTI_CHILD_IMAGE_ID=image_id,
        NTI_CHILD_DST="",
        NTI_CHILD_REPORT=report,
        NTI_CHILD_RELEASE=str(tmp_path / "release"),
    )
    child = subprocess.Popen(
        [sys.executable, CHILD, "--config-file", str(config)],
        env=env,
        stdout=open(root / "output.log", "w"),  # noqa: SIM115  closed with the process
        stderr=subprocess.STDOUT,
    )
    return child, report


def wait_for(path: str, child: subprocess.Popen, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert child.poll() is None, f"child exited {child.returncode}"
        assert time.monotonic() < deadline, f"no {path}"
        time.sleep(0.1)
    time.sleep(0.05)  # written whole: json.dump of a small dict
    with open(path) as f:
        return json.load(f)


def test_nova_precache_goes_through_the_swarm_and_the_second_host_takes_from_the_first(
    make_image, hosts, glance_server, tmp_path, tracker
):
    from nova_torrent_images.origin.tracker import tracker_hashes, write_whitelist

    image = make_image(32 * MiB)
    write_whitelist(
        tracker.whitelist_path,
        tracker_hashes(image.torrent.info_hash_v1, image.torrent.info_hash_v2),
    )
    os.kill(tracker.pid, 1)  # SIGHUP: opentracker rereads its whitelist
    tracker.wait_allowed(image.torrent.info_hash_v1)
    origin = hosts("origin", upload_rate_limit=ORIGIN_KIB)
    origin.seed(image.torrent.data, image.path, trackers=[tracker.announce_url])
    image.set_magnet(peers=[origin.endpoint], trackers=[tracker.announce_url])
    first, first_report = start_host(tmp_path, glance_server, image.id, "compute-1")
    second = None
    try:
        cached_first = wait_for(first_report + ".cached", first)
        second, second_report = start_host(tmp_path, glance_server, image.id, "compute-2")
        cached_second = wait_for(second_report + ".cached", second)
        gets = glance_gets(glance_server, image.id)
        (tmp_path / "release").write_text("")
        assert first.wait(timeout=60) == 0 and second.wait(timeout=60) == 0
        done_first, done_second = wait_for(first_report, first), wait_for(second_report, second)
    finally:
        for child in (first, second):
            if child is not None and child.poll() is None:
                child.kill()
    digest = image.record["os_hash_value"]
    print(f"\nfirst: {json.dumps(cached_first)}\nsecond: {json.dumps(cached_second)}")
    for cached in (cached_first, cached_second):
        assert cached["first"] is True  # fetched by this call
        assert cached["fetched"]["source"] == "torrent" and cached["fetched"]["glance"] == 0
        assert cached["sha512"] == digest  # Nova's cache file holds the verified image
        assert cached["seeding"] == [image.id]  # the base copy is seeded
    # The second host took at least half its bytes from the first (its peer), not the
    # origin, whose uplink is capped lower.
    assert cached_second["fetched"]["peers"] >= 0.5 * image.record["size"]
    # Later: already cached, and Glance is not asked anything.
    assert done_first["second"] is False and done_second["second"] is False
    assert glance_gets(glance_server, image.id) == gets
    with open(image.path, "rb") as f:
        assert hashlib.file_digest(f, "sha512").hexdigest() == digest
