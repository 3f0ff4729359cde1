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

"""Single host, no caps: the torrent path with default settings and with
``trust_torrent_root = true``, against plain HTTP, in one run.

The origin is what operators run: a Glance-like ``HTTPOrigin`` and the product's origin
node (publisher, origin seeder, stripe server; v2 torrents, the default), with no upload
cap. The compute host is a ``bench/fleet_host.py`` process of its own, fetching through
``nova_torrent_images.compute.pipeline.fetch_to_file``: with the default settings (the whole image
is checked against Glance's sha512, the bytes that arrive in order while they arrive),
with ``trust_torrent_root = true`` (the v2 torrent bound to Glance's hash by the publisher:
no whole-image hash), and with ``mode = none`` (plain HTTP from the same origin: one
streaming sha512 pass). Each torrent fetch gets a freshly started origin seeder (a fresh
stripe dispenser, as after an origin restart), so every fetch starts from the same state.
Runs are interleaved (each variant once per round, the order rotating); the ratios use
the best run of each variant, the medians are given too, and min/median/max of every
variant's seconds and CPU.

CPU is the compute host's: user + system seconds of its process from its ``go`` to its
done (every thread, libtorrent's included), per GiB delivered. A peer client is measured
in the same rounds: Debian's aria2c fetching the same bytes as a v1 torrent from an origin
node of the same kind (``peer_client.py``), timed from its start (it has no ``go``: about
2 s of its own start-up, a tracker round and its first connection, are in its time).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import peer_client  # noqa: E402
from common import MiB, spread, write_image  # noqa: E402
from fleet import run_hosts  # noqa: E402

from nova_torrent_images.testing.http_origin import HTTPOrigin  # noqa: E402
from nova_torrent_images.testing.origin_node import start_origin_node  # noqa: E402

# (name, fetch mode, trust_torrent_root)
VARIANTS = [("http", "none", False), ("default", "torrent", False), ("trusted", "torrent", True)]


def run(size_mib: int = 512, rounds: int = 3, workdir: str | None = None, tracker=None) -> dict:
    """``tracker``: a started opentracker for the aria2 rounds (none: no aria2 rounds)."""
    root = workdir or tempfile.mkdtemp(prefix="nti-bench-single-")
    os.makedirs(root, exist_ok=True)
    size = size_mib * MiB
    image_path = os.path.join(root, "image.raw")
    write_image(image_path, size)
    names = [name for name, _, _ in VARIANTS]
    peer = None if tracker is None else peer_client.ensure_aria2c()
    if tracker is None:
        peer = "no tracker to introduce aria2c to the origin"
    if peer is None:
        names.append("aria2")
    seconds: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    sources: dict[str, set[str]] = {name: set() for name in names}
    v1 = None
    try:
        with HTTPOrigin(os.path.join(root, "origin")) as origin:
            image_id = origin.create_image(image_path, name="bench-single")["id"]
            if peer is None:
                v1 = peer_client.V1Origin(origin, image_path, root, cap_kib=0, tracker=tracker)
            os.unlink(image_path)
            state = os.path.join(root, "origin-state")
            start_origin_node(origin.url, state, upload_kib=0).publish(image_id)
            variants = [*VARIANTS, *([("aria2", "aria2", False)] if v1 else [])]
            for i in range(rounds):
                shift = i % len(variants)
                for name, mode, trusted in variants[shift:] + variants[:shift]:
                    if mode == "aria2":
                        got = peer_client.run_fleet(
                            1, v1, root, tracker_url=tracker.announce_url, cap_kib=0
                        )
                        seconds[name].append(got["seconds"])
                        cpu[name].append(got["cpu_seconds"])
                        sources[name].add("aria2")
                        continue
                    node = None
                    if mode == "torrent":
                        # Published already: this only starts a seeder (and dispenser).
                        node = start_origin_node(origin.url, state, upload_kib=0)
                        node.publish(image_id)
                    try:
                        result = run_hosts(
                            1,
                            root,
                            origin.url,
                            image_id,
                            cap_kib=0,
                            mode=mode,
                            egress=lambda: 0,
                            trust=trusted,
                            prefix=f"{name}-{i}",
                        )
                    finally:
                        if node is not None:
                            node.stop()
                    host = result["per_host"][0]
                    seconds[name].append(host["done"] - host["started"])
                    cpu[name].append(host["cpu_user"] + host["cpu_system"])
                    sources[name].add(host["source"])
                    shutil.rmtree(os.path.join(root, f"{name}-{i}-0"), ignore_errors=True)
    finally:
        if v1 is not None:
            v1.stop()
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    best = {name: min(times) for name, times in seconds.items()}
    med = {name: statistics.median(times) for name, times in seconds.items()}
    gib = size / (1024 * MiB)
    per_gib = {name: [c / gib for c in values] for name, values in cpu.items()}
    return {
        "size_mib": size_mib,
        "rounds": rounds,
        "seconds_spread": {name: spread(t) for name, t in seconds.items()},
        "cpu_s_per_gib": {name: spread(v) for name, v in per_gib.items()},
        # CPU per GiB against plain HTTP's, median over rounds (each round's own pair).
        "cpu_over_http": {
            name: round(
                statistics.median(
                    c / h for c, h in zip(per_gib[name], per_gib["http"], strict=False)
                ),
                3,
            )
            for name in per_gib
        },
        "peer_client": peer or "aria2c 1.36, v1 torrent",
        "mib_s": {name: round(size_mib / t, 1) for name, t in best.items()},
        "ratio_default": round(best["http"] / best["default"], 3),
        "ratio_trusted_root": round(best["http"] / best["trusted"], 3),
        "ratio_default_median": round(med["http"] / med["default"], 3),
        "ratio_trusted_root_median": round(med["http"] / med["trusted"], 3),
        "seconds": {name: [round(t, 3) for t in times] for name, times in seconds.items()},
        "sources": {name: sorted(s) for name, s in sources.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=512, help="MiB")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", help="keep the hosts' logs here")
    args = parser.parse_args()
    from fleet import _start_tracker

    tracker = _start_tracker(args.workdir or tempfile.mkdtemp(prefix="nti-bench-tracker-"))
    try:
        result = run(args.size, args.rounds, workdir=args.workdir, tracker=tracker)
    finally:
        if tracker is not None:
            tracker.stop()
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
