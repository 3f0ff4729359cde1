"""Single host, no caps: one swarm fetch from one seeder against one plain HTTP download.

Both paths end with the same verification against Glance's sha512, so the ratio compares
delivery, not bookkeeping.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import MiB, http_download, write_image  # noqa: E402

from nova_torrent_images.glance import GlanceClient  # noqa: E402
from nova_torrent_images.pipeline import fetch_to_file  # noqa: E402
from nova_torrent_images.swarm.torrent import make_torrent  # noqa: E402
from nova_torrent_images.testing.http_origin import HTTPOrigin  # noqa: E402
from nova_torrent_images.testing.swarm import SimulatedHost  # noqa: E402


def run(size_mib: int = 512, repeat: int = 3, workdir: str | None = None) -> dict:
    root = workdir or tempfile.mkdtemp(prefix="nti-bench-single-")
    size = size_mib * MiB
    image_path = os.path.join(root, "image.raw")
    write_image(image_path, size)
    hosts = []
    try:
        with HTTPOrigin(os.path.join(root, "origin")) as origin:
            record = origin.create_image(image_path, name="bench")
            glance = GlanceClient.for_endpoint(origin.url)
            seeder = SimulatedHost("seeder")
            hosts.append(seeder)
            torrent = make_torrent(image_path, name=record["id"])
            seeder.seed(torrent.data, image_path, seed_mode=False)
            glance.set_properties(
                record["id"],
                is_torrentable="true",
                torrent_magnet=torrent.magnet(peers=[seeder.endpoint]),
            )
            image = glance.image_info(record["id"])
            http_times, bt_times = [], []
            for i in range(repeat):  # interleaved, so drift of the machine hits both
                dest = os.path.join(root, f"http-{i}")
                http_times.append(http_download(glance, image, dest))
                os.unlink(dest)
                host = SimulatedHost(f"host-{i}")
                hosts.append(host)
                dest = os.path.join(root, f"bt-{i}")
                t0 = time.monotonic()
                result = fetch_to_file(image, dest, conf=host.conf, glance=None, engine=host.engine)
                bt_times.append(time.monotonic() - t0)
                assert result.source == "torrent"
                os.unlink(dest)
                host.stop()
        http_best, bt_best = min(http_times), min(bt_times)
        return {
            "size_mib": size_mib,
            "http_mib_s": size_mib / http_best,
            "torrent_mib_s": size_mib / bt_best,
            "ratio": http_best / bt_best,
            "http_seconds": http_times,
            "torrent_seconds": bt_times,
        }
    finally:
        for host in hosts:
            host.stop()
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=512, help="MiB")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps(run(args.size, args.repeat), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
