"""Fleet delivery: N hosts fetch one image, by torrent and by plain HTTP, same origin cap.

The origin's uplink is capped (default 32 MiB/s) and so is each host's downlink. Plain HTTP
is bound by the origin: N copies through one uplink. By torrent the origin seeds each piece
about once and the hosts trade the rest among themselves.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import MiB, http_download, median, percentile, write_image  # noqa: E402

from nova_torrent_images.glance import GlanceClient  # noqa: E402
from nova_torrent_images.pipeline import fetch_to_file  # noqa: E402
from nova_torrent_images.testing.http_origin import HTTPOrigin  # noqa: E402
from nova_torrent_images.testing.origin_node import start_origin_node  # noqa: E402
from nova_torrent_images.testing.swarm import SimulatedHost  # noqa: E402


def _in_threads(fn, count: int) -> list:
    results: list = [None] * count
    errors: list = []

    def run(i: int) -> None:
        try:
            results[i] = fn(i)
        except Exception as exc:  # noqa: BLE001  reported after the join
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def run(
    hosts: int = 16,
    size_mib: int = 256,
    cap_mib: int = 32,
    workdir: str | None = None,
    tracker: bool = True,
    super_seed: bool = True,
) -> dict:
    root = workdir or tempfile.mkdtemp(prefix="nti-bench-fleet-")
    size, cap = size_mib * MiB, cap_mib * MiB
    image_path = os.path.join(root, "image.raw")
    write_image(image_path, size)
    results: dict = {"hosts": hosts, "size_mib": size_mib, "cap_mib": cap_mib}
    try:
        with HTTPOrigin(os.path.join(root, "origin"), upload_rate=cap) as origin:
            record = origin.create_image(image_path, name="bench")
            glance = GlanceClient.for_endpoint(origin.url)
            image = glance.image_info(record["id"])

            # -- plain HTTP fleet ------------------------------------------------------
            served_before = origin.bytes_served
            t0 = time.monotonic()
            http_times = _in_threads(
                lambda i: http_download(glance, image, os.path.join(root, f"http-{i}"), cap), hosts
            )
            results["http_seconds"] = time.monotonic() - t0
            results["http_origin_ratio"] = (origin.bytes_served - served_before) / size
            results["http_p50"], results["http_p99"] = (
                median(http_times),
                percentile(http_times, 99),
            )
            for i in range(hosts):
                os.unlink(os.path.join(root, f"http-{i}"))

            # -- torrent fleet: publish, then the origin seeder serves the swarm --------
            tracker_node = _start_tracker(root) if tracker else None
            try:
                for super_seed in (True, False):
                    key = "torrent" if super_seed else "torrent_no_super_seeding"
                    results[key] = _torrent_fleet(
                        origin, record["id"], root, hosts, cap_mib, super_seed, tracker_node
                    )
            finally:
                if tracker_node is not None:
                    tracker_node.stop()
            results["tracker"] = tracker_node is not None
            for name in ("seconds", "p50", "p99", "origin_ratio", "sources"):
                results[f"torrent_{name}"] = results["torrent"][name]
        results["speedup"] = results["http_seconds"] / results["torrent_seconds"]
        results["speedup_no_super_seeding"] = (
            results["http_seconds"] / results["torrent_no_super_seeding"]["seconds"]
        )
        return results
    finally:
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)


def _start_tracker(root: str):
    """Debian's opentracker on 127.0.0.1, or None when it is not installed."""
    from nova_torrent_images.testing.opentracker import Opentracker, find_binary

    if find_binary() is None:
        return None
    return Opentracker(workdir=os.path.join(root, "tracker")).start()


def _torrent_fleet(
    origin, image_id: str, root: str, hosts: int, cap_mib: int, super_seed: bool, tracker
) -> dict:
    """Publish (once) and seed with the product's origin side, then fetch on every host."""
    node = start_origin_node(
        origin.url,
        os.path.join(root, "origin-state"),
        upload_kib=cap_mib * 1024,
        tracker=tracker,
        super_seeding=super_seed,
    )
    glance, publisher, seeder = node.glance, node.publisher, node.seeder
    computes: list[SimulatedHost] = []
    try:
        node.publish(image_id)  # reads the image from the origin once (not timed)
        image = glance.image_info(image_id)
        computes = [
            SimulatedHost(f"compute-{i}", download_rate_limit=cap_mib * 1024, stall_timeout=120)
            for i in range(hosts)
        ]
        served_before, uploaded_before = origin.bytes_served, seeder.uploaded_bytes()
        t0 = time.monotonic()

        def one(i: int):
            result = fetch_to_file(
                image,
                os.path.join(root, f"bt-{i}"),
                conf=computes[i].conf,
                glance=glance,
                engine=computes[i].engine,
            )
            return result, time.monotonic() - t0

        outcomes = _in_threads(one, hosts)
        seconds = time.monotonic() - t0
        egress = seeder.uploaded_bytes() - uploaded_before + origin.bytes_served - served_before
        times = [t for _, t in outcomes]
        for i in range(hosts):
            os.unlink(os.path.join(root, f"bt-{i}"))
        return {
            "seconds": seconds,
            "p50": median(times),
            "p99": percentile(times, 99),
            "origin_ratio": egress / (image.size),
            "super_seeding": super_seed,
            "sources": sorted({r.source for r, _ in outcomes}),
        }
    finally:
        for c in computes:
            c.stop()
        seeder.stop()
        publisher.unpublish(image_id)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hosts", type=int, default=16)
    parser.add_argument("--size", type=int, default=256, help="MiB")
    parser.add_argument("--cap", type=int, default=32, help="MiB/s, origin and each host")
    parser.add_argument("--no-tracker", action="store_true")
    args = parser.parse_args()
    print(json.dumps(run(args.hosts, args.size, args.cap, tracker=not args.no_tracker), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
