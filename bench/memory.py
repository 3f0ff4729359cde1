"""Memory: peak RSS growth of a process fetching an image by torrent (and by HTTP).

The fetching process runs on its own; it reports its RSS once started (imports done,
libtorrent session up) and its peak RSS (VmHWM) after the verified fetch. The growth is
what a download adds to nova-compute's footprint.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import MiB, write_image  # noqa: E402


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(args: argparse.Namespace) -> int:
    from nova_torrent_images.compute.pipeline import fetch_to_file
    from nova_torrent_images.glance.client import GlanceClient
    from nova_torrent_images.testing.swarm import SimulatedHost

    glance = GlanceClient.for_endpoint(args.glance)
    image = glance.image_info(args.image_id)
    host = SimulatedHost("measured")
    baseline = _status_kib("VmRSS")
    if args.mode == "torrent":
        result = fetch_to_file(image, args.dest, conf=host.conf, glance=None, engine=host.engine)
        assert result.source == "torrent"
    else:
        # The same pipeline with torrents off: its plain, verified Glance path.
        host.conf.set_override("mode", "none", group="torrent_images")
        fetch_to_file(image, args.dest, conf=host.conf, glance=glance)
    peak = _status_kib("VmHWM")
    host.stop()
    print(
        json.dumps(
            {
                "baseline_mib": baseline / 1024,
                "peak_mib": peak / 1024,
                "growth_mib": (peak - baseline) / 1024,
            }
        )
    )
    return 0


def measure(size_mib: int, root: str) -> dict:
    from nova_torrent_images.glance.client import GlanceClient
    from nova_torrent_images.swarm.torrent import make_torrent
    from nova_torrent_images.testing.http_origin import HTTPOrigin
    from nova_torrent_images.testing.swarm import SimulatedHost

    image_path = os.path.join(root, f"image-{size_mib}.raw")
    write_image(image_path, size_mib * MiB)
    seeder = SimulatedHost("seeder")
    try:
        with HTTPOrigin(os.path.join(root, f"origin-{size_mib}")) as origin:
            record = origin.create_image(image_path)
            torrent = make_torrent(image_path, name=record["id"])
            seeder.seed(torrent.data, image_path, seed_mode=False)
            GlanceClient.for_endpoint(origin.url).set_properties(
                record["id"],
                is_torrentable="true",
                torrent_magnet=torrent.magnet(peers=[seeder.endpoint]),
            )
            out = {"size_mib": size_mib}
            for mode in ("torrent", "http"):
                dest = os.path.join(root, f"{mode}-{size_mib}")
                proc = subprocess.run(
                    [
                        sys.executable,
                        os.path.abspath(__file__),
                        "--child",
                        "--mode",
                        mode,
                        "--glance",
                        origin.url,
                        "--image-id",
                        record["id"],
                        "--dest",
                        dest,
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                    timeout=900,
                )
                out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
                os.unlink(dest)
            return out
    finally:
        seeder.stop()
        if os.path.exists(image_path):
            os.unlink(image_path)


def run(sizes: tuple[int, ...] = (256, 2048), workdir: str | None = None) -> dict:
    root = workdir or tempfile.mkdtemp(prefix="nti-bench-mem-")
    try:
        return {"sizes": [measure(size, root) for size in sizes]}
    finally:
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="256,2048", help="MiB, comma separated")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["torrent", "http"], help=argparse.SUPPRESS)
    parser.add_argument("--glance", help=argparse.SUPPRESS)
    parser.add_argument("--image-id", help=argparse.SUPPRESS)
    parser.add_argument("--dest", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    print(json.dumps(run(tuple(int(s) for s in args.sizes.split(","))), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
