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

"""Torrent formats on one host: v1, v2 and hybrid against plain HTTP, in one run.

One SimulatedHost seeds the image (one torrent per format), and a fresh SimulatedHost
fetches it through ``nova_torrent_images.compute.pipeline.fetch_to_file`` with the default
settings (so the whole image is hashed again against Glance's sha512 afterwards). The
baseline is a plain HTTP fetch of the same image from
``nova_torrent_images.testing.http_origin.HTTPOrigin`` through the same pipeline with
``mode = none`` (one streaming sha512 pass). The row ``v2+trust`` runs with
``trust_torrent_root = true`` and the bound hash property the publisher writes for v2
torrents, so the whole-image re-read is skipped (hybrid torrents are never trusted).
Runs are interleaved (every variant once per round, the order rotating), so drift of the
machine hits all of them; the best and the median of the rounds are printed, with the
ratio to HTTP.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import MiB, machine_description, write_image  # noqa: E402

from nova_torrent_images.compute.pipeline import fetch_to_file  # noqa: E402
from nova_torrent_images.glance.client import GlanceClient  # noqa: E402
from nova_torrent_images.swarm.torrent import make_torrent  # noqa: E402
from nova_torrent_images.testing.http_origin import HTTPOrigin  # noqa: E402
from nova_torrent_images.testing.swarm import SimulatedHost, make_conf  # noqa: E402

FORMATS = ("v1", "v2", "hybrid")
# (row name, torrent format or None for plain HTTP, trust_torrent_root)
VARIANTS = [
    ("http", None, False),
    ("v1", "v1", False),
    ("v2", "v2", False),
    ("hybrid", "hybrid", False),
    ("v2+trust", "v2", True),
]


def run(size_mib: int = 256, rounds: int = 5, trust: bool = True) -> dict:
    root = tempfile.mkdtemp(prefix="nti-bench-formats-")
    size = size_mib * MiB
    image_path = os.path.join(root, "image.raw")
    write_image(image_path, size)
    variants = [v for v in VARIANTS if trust or not v[2]]
    seconds: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    make_seconds: dict[str, float] = {}
    seeder = None
    try:
        with HTTPOrigin(os.path.join(root, "origin")) as origin:
            record = origin.create_image(image_path, name="bench-formats")
            image_id = record["id"]
            glance = GlanceClient.for_endpoint(origin.url)
            seeder = SimulatedHost("seeder")
            torrents = {}
            for fmt in FORMATS:
                t0 = time.monotonic()
                torrents[fmt] = make_torrent(image_path, name=image_id, version=fmt)
                make_seconds[fmt] = time.monotonic() - t0
                # Claimed, not hashed on first request: a verified origin copy.
                seeder.seed(torrents[fmt].data, image_path, seed_mode=False)
            for i in range(rounds):
                shift = i % len(variants)
                for name, fmt, trusted in variants[shift:] + variants[:shift]:
                    dest = os.path.join(root, f"{name}-{i}")
                    if fmt is None:
                        conf, host = make_conf(mode="none"), None
                    else:
                        torrent = torrents[fmt]
                        glance.set_properties(
                            image_id,
                            is_torrentable="true",
                            torrent_magnet=torrent.magnet(peers=[seeder.endpoint]),
                            torrent_bound_hash=(
                                f"{record['os_hash_algo']}:{record['os_hash_value']}:"
                                f"{torrent.info_hash_v2}"
                            ),
                        )
                        host = SimulatedHost(f"{name}-{i}", trust_torrent_root=trusted)
                        conf = host.conf
                    image = glance.image_info(image_id)
                    try:
                        t0 = time.monotonic()
                        result = fetch_to_file(
                            image,
                            dest,
                            conf=conf,
                            glance=glance if host is None else None,
                            engine=host.engine if host else None,
                        )
                        seconds[name].append(time.monotonic() - t0)
                    finally:
                        if host is not None:
                            host.stop()
                    assert result.source == ("glance" if fmt is None else "torrent"), result
                    os.unlink(dest)
                    if host is None:
                        shutil.rmtree(conf.torrent_images.state_dir, ignore_errors=True)
    finally:
        if seeder is not None:
            seeder.stop()
        shutil.rmtree(root, ignore_errors=True)
    http_best, http_median = min(seconds["http"]), statistics.median(seconds["http"])
    rows = {}
    for name, times in seconds.items():
        best, med = min(times), statistics.median(times)
        rows[name] = {
            "best_mib_s": round(size_mib / best, 1),
            "median_mib_s": round(size_mib / med, 1),
            "ratio_best": round(http_best / best, 2),
            "ratio_median": round(http_median / med, 2),
            "seconds": [round(t, 3) for t in times],
        }
    return {
        "machine": machine_description(),
        "size_mib": size_mib,
        "rounds": rounds,
        "make_torrent_seconds": {k: round(v, 2) for k, v in make_seconds.items()},
        "rows": rows,
    }


def print_table(result: dict) -> None:
    print(result["machine"])
    print(f"{result['size_mib']} MiB, {result['rounds']} rounds, single host over loopback")
    print(f"{'variant':<14}{'best MiB/s':>12}{'median MiB/s':>14}{'x HTTP (best)':>15}"
          f"{'x HTTP (median)':>17}")  # fmt: skip
    for name, row in result["rows"].items():
        print(
            f"{name:<14}{row['best_mib_s']:>12.1f}{row['median_mib_s']:>14.1f}"
            f"{row['ratio_best']:>15.2f}{row['ratio_median']:>17.2f}"
        )
    made = ", ".join(f"{k} {v:.2f}s" for k, v in result["make_torrent_seconds"].items())
    print(f"make_torrent (publish-side hashing): {made}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=256, help="MiB (default 256)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--no-trust", action="store_true", help="skip the v2+trust row")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    result = run(args.size, args.rounds, trust=not args.no_trust)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
