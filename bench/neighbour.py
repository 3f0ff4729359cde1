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

"""The neighbour effect: what an image download does to a guest on the same host.

A guest-like workload of our own runs in separate processes at the default priority: a
writer doing fsync'ed 1 MiB writes to a file on the same disk as the image store, and CPU
loops (one per core, a guest using all its vCPUs). It reports MiB/s and loop
iterations/s over a fixed window:

* alone;
* while a 256 MiB image downloads through the pipeline
  (:func:`nova_torrent_images.compute.pipeline.fetch_to_file`, whole-image sha512 included) from a
  ``SimulatedHost`` seeder on loopback, again and again for the whole window, with the
  default settings (``qos_nice = 10``, ``qos_io_class = best-effort``: level 7);
* the same with QoS off (``qos_nice = 0``, ``qos_io_class = none``).

Phases are interleaved over ``--rounds``; each phase is compared with the workload alone
in the same round and the median of those ratios is reported (target: at least 80% with
the defaults). The download rate is reported too: it is
what the guests' share costs the image. No cgroup is involved (``qos_cgroup`` unset).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import MiB, write_image  # noqa: E402

from nova_torrent_images.compute.pipeline import fetch_to_file  # noqa: E402
from nova_torrent_images.glance.client import GlanceClient  # noqa: E402
from nova_torrent_images.swarm.torrent import make_torrent  # noqa: E402
from nova_torrent_images.testing.http_origin import HTTPOrigin  # noqa: E402
from nova_torrent_images.testing.swarm import SimulatedHost  # noqa: E402

QOS = {
    "default": {},
    "qos-off": {"qos_nice": 0, "qos_io_class": "none"},
}
WRITE_SPAN = 64  # MiB the writer cycles over


# -- the guest-like workload (child processes) -----------------------------------------
def _writer(path: str, seconds: float) -> dict:
    block = os.urandom(MiB)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    n = 0
    try:
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            os.pwrite(fd, block, (n % WRITE_SPAN) * MiB)
            os.fsync(fd)
            n += 1
        elapsed = time.monotonic() - start
    finally:
        os.close(fd)
    return {"write_mib_s": n / elapsed}


def _cpu(seconds: float) -> dict:
    n = 0
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        sum(range(1000))
        n += 1
    return {"loops_s": n / (time.monotonic() - start)}


def workload(directory: str, seconds: float, cpu_workers: int) -> dict:
    """Start the writer and the CPU loops; their rates once the window is over."""
    script = os.path.abspath(__file__)
    procs = [
        subprocess.Popen(
            [sys.executable, script, "--child", "writer", directory, str(seconds)],
            stdout=subprocess.PIPE,
        )
    ]
    procs += [
        subprocess.Popen(
            [sys.executable, script, "--child", "cpu", directory, str(seconds)],
            stdout=subprocess.PIPE,
        )
        for _ in range(cpu_workers)
    ]
    results = [json.loads(p.communicate()[0]) for p in procs]
    return {
        "write_mib_s": results[0]["write_mib_s"],
        "loops_s": sum(r["loops_s"] for r in results[1:]),
    }


# -- the image work -------------------------------------------------------------------
def downloads_during(
    root: str, origin: HTTPOrigin, image_id: str, torrent, overrides: dict, stop: threading.Event
) -> dict:
    """Fetch the image through the pipeline again and again until ``stop``."""
    glance = GlanceClient.for_endpoint(origin.url)
    seeder = SimulatedHost("seeder", **overrides)
    compute = SimulatedHost("compute", **overrides)
    try:
        seeder.seed(torrent.data, origin.data_path(image_id))
        magnet = torrent.magnet(peers=[seeder.endpoint], max_length=None)
        with origin.lock:
            origin.images[image_id].update(is_torrentable="true", torrent_magnet=magnet)
        info = glance.image_info(image_id)
        done, seconds, sources = 0, 0.0, set()
        while not stop.is_set():
            destination = os.path.join(root, "fetched.raw")
            started = time.monotonic()
            result = fetch_to_file(
                info, destination, conf=compute.conf, glance=glance, engine=compute.engine
            )
            seconds += time.monotonic() - started
            sources.add(result.source)
            done += 1
            os.unlink(destination)
        return {
            "downloads": done,
            "download_mib_s": done * info.size / MiB / seconds if seconds else 0.0,
            "sources": sorted(sources),
        }
    finally:
        compute.stop()
        seeder.stop()


def phase(root, origin, image_id, torrent, name, seconds, cpu_workers) -> dict:
    if name == "alone":
        return workload(root, seconds, cpu_workers)
    stop = threading.Event()
    out: dict = {}

    def run() -> None:
        try:
            out.update(downloads_during(root, origin, image_id, torrent, QOS[name], stop))
        except Exception as exc:  # noqa: BLE001  reported in the result
            out["error"] = repr(exc)

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(1.0)  # the hosts are up and the first download is running
    rates = workload(root, seconds, cpu_workers)
    stop.set()
    thread.join()
    return {**rates, **out}


def run(size_mib=256, seconds=15.0, rounds=2, cpu_workers=None, workdir=None) -> dict:
    cpu_workers = cpu_workers or os.cpu_count() or 1
    root = workdir or tempfile.mkdtemp(prefix="nti-bench-neighbour-")
    os.makedirs(root, exist_ok=True)
    names = ["alone", "default", "qos-off"]
    runs: dict[str, list[dict]] = {n: [] for n in names}
    try:
        with HTTPOrigin(os.path.join(root, "glance")) as origin:
            path = os.path.join(root, "image.raw")
            write_image(path, size_mib * MiB)
            torrent = make_torrent(path, name="neighbour", version="v2")
            image_id = origin.create_image(path, name="neighbour")["id"]
            os.unlink(path)
            for i in range(rounds):
                shift = i % len(names)
                for name in names[shift:] + names[:shift]:
                    runs[name].append(
                        phase(root, origin, image_id, torrent, name, seconds, cpu_workers)
                    )
    finally:
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)

    def med(name: str, key: str) -> float:
        values = [r[key] for r in runs[name] if key in r]
        return statistics.median(values) if values else float("nan")

    def ratio(name: str, key: str) -> float:
        # Each round against the workload alone in the same round (the machine's other
        # load drifts between rounds), then the median over rounds.
        values = [r[key] / a[key] for r, a in zip(runs[name], runs["alone"], strict=True)]
        return round(statistics.median(values), 3)

    alone_w, alone_c = med("alone", "write_mib_s"), med("alone", "loops_s")
    summary = {}
    for name in ("default", "qos-off"):
        summary[name] = {
            "write_vs_alone": ratio(name, "write_mib_s"),
            "cpu_vs_alone": ratio(name, "loops_s"),
            "download_mib_s": round(med(name, "download_mib_s"), 1),
        }
    return {
        "size_mib": size_mib,
        "window_s": seconds,
        "rounds": rounds,
        "cpu_workers": cpu_workers,
        "alone": {"write_mib_s": round(alone_w, 1), "loops_s": round(alone_c)},
        "summary": summary,
        "runs": runs,
    }


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, directory, seconds = sys.argv[2], sys.argv[3], float(sys.argv[4])
        if kind == "writer":
            path = os.path.join(directory, f"guest-disk-{os.getpid()}.img")
            try:
                print(json.dumps(_writer(path, seconds)))
            finally:
                os.unlink(path)
        else:
            print(json.dumps(_cpu(seconds)))
        return 0
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=256, help="image MiB")
    parser.add_argument("--seconds", type=float, default=15.0, help="workload window")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cpu-workers", type=int, help="CPU loops (default: one per core)")
    parser.add_argument("--workdir", help="on the disk to measure (default: a temp dir)")
    args = parser.parse_args()
    result = run(args.size, args.seconds, args.rounds, args.cpu_workers, args.workdir)
    print(json.dumps(result, indent=1))
    s = result["summary"]
    for name in ("default", "qos-off"):
        print(
            f"{name:8s} guest writes {s[name]['write_vs_alone']:.0%} of alone, "
            f"guest CPU {s[name]['cpu_vs_alone']:.0%}, image {s[name]['download_mib_s']} MiB/s",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
