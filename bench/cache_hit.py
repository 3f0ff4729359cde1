"""Cache hit: the second boot of an image is a clone of the local base copy.

Boots go through the real XenAPI torrent handler against the fake XAPI (clones are copy on
write there, as on a real SR), so the time is the handler's own: Glance metadata, the base
copy lookup, the per-image lock and ``VDI.clone``. It must not grow with the image size.
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

from common import MiB, median, write_image  # noqa: E402

from nova_torrent_images.glance.client import GlanceClient  # noqa: E402
from nova_torrent_images.testing.fake_xenapi import FakeXenAPI, GiB  # noqa: E402
from nova_torrent_images.testing.http_origin import HTTPOrigin  # noqa: E402
from nova_torrent_images.testing.swarm import SimulatedHost  # noqa: E402
from nova_torrent_images.virt.xenapi.handler import TorrentImageHandler  # noqa: E402


def measure(size_mib: int, root: str, boots: int = 10) -> dict:
    image_path = os.path.join(root, f"image-{size_mib}.raw")
    write_image(image_path, size_mib * MiB)
    host = SimulatedHost("compute", state_dir=os.path.join(root, f"state-{size_mib}"))
    try:
        with (
            HTTPOrigin(os.path.join(root, f"origin-{size_mib}")) as origin,
            FakeXenAPI.create(
                os.path.join(root, f"xapi-{size_mib}"),
                sr_size=4 * size_mib * MiB + 8 * GiB,
                use_loop_devices=False,
            ) as fake,
        ):
            record = origin.create_image(image_path)
            os.unlink(image_path)
            glance = GlanceClient.for_endpoint(origin.url)
            session = fake.session()
            fake.configure(host.conf)
            handler = TorrentImageHandler(
                host.conf, glance_factory=lambda c: glance, engine=host.engine
            )
            t0 = time.monotonic()
            handler.download_image(None, session, {"name": "vm-0"}, record["id"])
            first = time.monotonic() - t0
            times = []
            for n in range(1, boots + 1):
                t0 = time.monotonic()
                handler.download_image(None, session, {"name": f"vm-{n}"}, record["id"])
                times.append(time.monotonic() - t0)
            handler.shutdown()
            session.xenapi.session.logout()
        return {
            "size_mib": size_mib,
            "first_boot_s": first,
            "hit_median_ms": median(times) * 1e3,
            "hit_max_ms": max(times) * 1e3,
        }
    finally:
        host.stop()


def run(sizes: tuple[int, ...] = (64, 1024), workdir: str | None = None) -> dict:
    root = workdir or tempfile.mkdtemp(prefix="nti-bench-cache-")
    try:
        return {"sizes": [measure(size, root) for size in sizes]}
    finally:
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="64,1024", help="MiB, comma separated")
    args = parser.parse_args()
    print(json.dumps(run(tuple(int(s) for s in args.sizes.split(","))), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
