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

from nova_torrent_images.fetch import fetch  # noqa: E402
from nova_torrent_images.glance import GlanceClient  # noqa: E402
from nova_torrent_images.swarm.torrent import make_torrent  # noqa: E402
from nova_torrent_images.testing.http_origin import HTTPOrigin  # noqa: E402
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
    started_hosts: list[SimulatedHost] = []
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

            # -- torrent fleet ---------------------------------------------------------
            seeder = SimulatedHost("origin-seeder", upload_rate_limit=cap_mib * 1024)
            started_hosts.append(seeder)
            if os.environ.get("NTI_ORIGIN_SETTINGS"):
                seeder.engine.session.apply_settings(json.loads(os.environ["NTI_ORIGIN_SETTINGS"]))
            torrent = make_torrent(image_path, name=record["id"])
            trackers = []
            tracker_proc = None
            if tracker:
                tracker_proc, url = _start_tracker(root, torrent)
                trackers = [url] if url else []
            seeder.seed(torrent.data, image_path, trackers=trackers or None, super_seed=super_seed)
            magnet = torrent.magnet(peers=[seeder.endpoint], trackers=trackers, max_length=None)
            glance.set_properties(record["id"], is_torrentable="true", torrent_magnet=magnet)
            image = glance.image_info(record["id"])
            computes = [
                SimulatedHost(f"compute-{i}", download_rate_limit=cap_mib * 1024, stall_timeout=120)
                for i in range(hosts)
            ]
            started_hosts.extend(computes)
            if os.environ.get("NTI_PEER_SETTINGS"):
                for c in computes:
                    c.engine.session.apply_settings(json.loads(os.environ["NTI_PEER_SETTINGS"]))
            served_before = origin.bytes_served
            t0 = time.monotonic()

            def torrent_one(i: int):
                r = fetch(
                    image,
                    os.path.join(root, f"bt-{i}"),
                    conf=computes[i].conf,
                    glance=glance,
                    engine=computes[i].engine,
                )
                return r, time.monotonic() - t0

            outcomes = _in_threads(torrent_one, hosts)
            results["torrent_seconds"] = time.monotonic() - t0
            bt_times = [t for _, t in outcomes]
            results["torrent_p50"], results["torrent_p99"] = (
                median(bt_times),
                percentile(bt_times, 99),
            )
            glance_bytes = origin.bytes_served - served_before
            results["torrent_origin_ratio"] = (seeder.uploaded_bytes() + glance_bytes) / size
            results["torrent_sources"] = sorted({r.source for r, _ in outcomes})
            results["tracker"] = bool(trackers)
            if tracker_proc is not None:
                tracker_proc.stop()
        results["speedup"] = results["http_seconds"] / results["torrent_seconds"]
        return results
    finally:
        for host in started_hosts:
            host.stop()
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)


def _start_tracker(root: str, torrent):
    """Debian's opentracker on 127.0.0.1 with this torrent whitelisted, or (None, None)."""
    from nova_torrent_images.origin.tracker import tracker_hashes, write_whitelist
    from nova_torrent_images.testing.opentracker import Opentracker, find_binary

    if find_binary() is None:
        return None, None
    tracker = Opentracker(workdir=os.path.join(root, "tracker"))
    os.makedirs(tracker.workdir, exist_ok=True)
    write_whitelist(
        tracker.whitelist_path, tracker_hashes(torrent.info_hash_v1, torrent.info_hash_v2)
    )
    tracker.start()
    return tracker, tracker.announce_url


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
