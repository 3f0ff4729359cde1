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

"""``nova-torrent-images fetch`` killed and run again, with and without ``--output``."""

from __future__ import annotations

import glob
import hashlib
import os
import signal
import subprocess
import sys
import time

from nova_torrent_images.compute.pipeline import ImagePipeline, fetch_to_file
from nova_torrent_images.compute.stores.filesystem import FilesystemStore
from nova_torrent_images.testing.http_origin import HTTPOrigin

MiB = 1024 * 1024


def sha512_of(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha512").hexdigest()


def cli(config: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "nova_torrent_images.cmd.main", "--config-file", config, *args]


def write_config(tmp_path, endpoint: str, **extra: str) -> str:
    path = tmp_path / "nti.conf"
    lines = [
        "[torrent_images]",
        "store = filesystem",
        f"state_dir = {tmp_path / 'state'}",
        f"glance_endpoint = {endpoint}",
        "glance_noauth = true",
        "listen_interfaces = 127.0.0.251:0",
        *(f"{k} = {v}" for k, v in extra.items()),
    ]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_killed_fetch_output_leaves_no_image_under_the_final_name(tmp_path):
    image_path = tmp_path / "image.raw"
    image_path.write_bytes(os.urandom(16 * MiB))
    # 4 MiB/s: the download takes about four seconds, time enough to kill it midway.
    with HTTPOrigin(str(tmp_path / "origin"), upload_rate=4 * MiB) as origin:
        record = origin.create_image(str(image_path))
        config = write_config(tmp_path, origin.url, mode="none")
        out = tmp_path / "out" / "image.raw"
        out.parent.mkdir()
        proc = subprocess.Popen(
            cli(config, "fetch", "--quiet", record["id"], "--output", str(out)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        parts: list[str] = []
        while time.monotonic() < deadline:
            parts = glob.glob(str(out.parent / ".image.raw.part-*"))
            if parts and os.path.getsize(parts[0]) > 2 * MiB:
                break
            time.sleep(0.05)
        assert parts, "the fetch never started writing"
        proc.send_signal(signal.SIGKILL)
        proc.wait()

        assert not out.exists(), "a killed fetch left a truncated image under the final name"
        assert glob.glob(str(out.parent / ".image.raw.part-*")) == parts

        again = subprocess.run(
            cli(config, "fetch", "--quiet", record["id"], "--output", str(out)),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert again.returncode == 0, again.stderr
        assert sha512_of(str(out)) == record["os_hash_value"]
        assert os.listdir(out.parent) == ["image.raw"]  # the dead fetch's part is gone

        third = subprocess.run(
            cli(config, "fetch", "--quiet", record["id"], "--output", str(out)),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert third.returncode != 0 and "refusing to overwrite" in third.stderr
        assert sha512_of(str(out)) == record["os_hash_value"]


def test_prefetched_base_copy_is_seeded_by_the_long_running_process(
    make_image, hosts, glance_server, tmp_path
):
    image = make_image(16 * MiB)
    origin = hosts("origin")
    origin.seed(image.torrent.data, image.path)
    image.set_magnet(peers=[origin.endpoint])
    config = write_config(tmp_path, glance_server.url)
    fetched = subprocess.run(
        cli(config, "fetch", "--quiet", image.id), capture_output=True, text=True, timeout=120
    )
    assert fetched.returncode == 0, fetched.stderr

    # nova-compute's process on the same host starts and takes over the base copy.
    compute = hosts("compute", state_dir=str(tmp_path / "state"))
    store = FilesystemStore(str(tmp_path / "state" / "images"))
    pipeline = ImagePipeline(compute.conf, store, engine=compute.engine)
    pipeline.start()
    try:
        assert pipeline.seeds.seeding() == [image.id]
        origin.stop()  # only the prefetching host has the image now
        image.set_magnet(peers=[compute.endpoint])
        peer = hosts("peer")
        dest = str(tmp_path / "peer.raw")
        result = fetch_to_file(
            glance_server_image(glance_server, image.id),
            dest,
            conf=peer.conf,
            glance=None,
            engine=peer.engine,
        )
        assert result.source == "torrent"
        assert set(result.swarm.per_peer) == {f"{compute.address}:{compute.engine.listen_port}"}
        assert sha512_of(dest) == image.record["os_hash_value"]
    finally:
        pipeline.shutdown()


def glance_server_image(glance_server, image_id):
    from nova_torrent_images.glance.client import GlanceClient

    return GlanceClient.for_endpoint(glance_server.url).image_info(image_id)
