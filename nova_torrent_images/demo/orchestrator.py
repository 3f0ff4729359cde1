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

"""The demo's main process: origin, publishing, hosts, progress bars and the table.

It starts a real glance-api on 127.0.0.1, publishes a generated raw image as a torrent
served by an origin seeder with a capped uplink, then starts N compute host processes
(each its own 127.0.0.x, libtorrent session and fake XenServer SR) and boots an instance on
each at once, then a second instance (a copy-on-write clone of the local base copy).
Finally the same hosts fetch the image once more over plain HTTP, for comparison: through
the same pipeline with ``mode = none``, from the same Glance behind the same uplink cap as
the origin seeder (a capped proxy, :mod:`nova_torrent_images.demo.capped_proxy`); the
table shows both, and the ratio of the last hosts' times.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

from oslo_utils import units

from nova_torrent_images import exception
from nova_torrent_images.compute.progress import HostProgress
from nova_torrent_images.testing.swarm import next_loopback_address

ORIGIN_UPLOAD_KIB = 32 * 1024  # 32 MiB/s: the origin uplink a fleet saturates
BOOT_TIMEOUT = 600
HTTP_ROUND = 3  # the plain HTTP fetch, after boots 1 and 2


@dataclass
class HostProcess:
    name: str
    address: str
    process: subprocess.Popen
    events: queue.Queue = field(default_factory=queue.Queue)
    boots: dict[int, dict] = field(default_factory=dict)

    def send(self, line: str) -> None:
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def read_events(self) -> None:
        for line in self.process.stdout:
            try:
                self.events.put(json.loads(line))
            except ValueError:
                self.events.put({"event": "noise", "line": line})
        self.events.put({"event": "exit"})

    def wait_for(self, kind: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                event = self.events.get(timeout=0.5)
            except queue.Empty:
                continue
            if event["event"] == kind:
                return event
            if event["event"] == "exit":
                raise exception.TorrentImagesError(f"demo host {self.name} exited; see its log")
        raise exception.TorrentImagesError(f"demo host {self.name}: no {kind} in {timeout}s")


def _write_image(path: str, size: int) -> None:
    with open(path, "wb") as f:  # random data: nothing compresses or dedupes on the way
        left = size
        while left:
            n = min(left, 8 * units.Mi)
            f.write(os.urandom(n))
            left -= n


def _origin(kind: str, root: str):
    """glance-api when installed (or asked for), else the embedded Glance-like origin."""
    if kind in ("auto", "glance"):
        try:
            from nova_torrent_images.testing.glance_server import GlanceServer
        except ImportError as exc:
            if kind == "glance":
                raise exception.TorrentImagesError(
                    f"--origin glance needs glance-api (pip install "
                    f"'nova-torrent-images[glance]'): {exc}"
                ) from exc
        else:
            return "glance-api", GlanceServer(workdir=os.path.join(root, "glance"))
    from nova_torrent_images.testing.http_origin import HTTPOrigin

    return "embedded HTTP origin", HTTPOrigin(os.path.join(root, "origin"))


def run(
    hosts: int = 4,
    size_mib: int = 64,
    workdir: str | None = None,
    origin_kind: str = "auto",
    results: dict | None = None,
) -> int:
    """Run the demo; 0 when every boot was verified. ``results`` gets the figures."""
    if hosts < 1 or size_mib < 1:
        raise exception.TorrentImagesError("--hosts and --size must be at least 1")
    own_dir = workdir is None
    root = workdir or tempfile.mkdtemp(prefix="nti-demo-")
    os.makedirs(root, exist_ok=True)
    logging.getLogger("nova_torrent_images").setLevel(logging.WARNING)
    size = size_mib * units.Mi
    started: list = []
    try:
        print(f"Demo in {root}: {hosts} compute hosts, one {size_mib} MiB raw image")
        image_path = os.path.join(root, "image.raw")
        _write_image(image_path, size)
        origin_name, origin_server = _origin(origin_kind, root)
        with origin_server as server:
            print(f"{origin_name} running at {server.url}")
            record = server.create_image(image_path, name="demo-image")
            image_id = record["id"]
            tracker = _start_tracker(root)
            if tracker is not None:
                started.append(tracker)
            seeder, magnet = _publish(server.url, root, image_id, tracker)
            started.append(seeder)
            print(
                f"published image {image_id} with `publish`; the origin seeder on "
                f"{seeder.endpoint[0]} (uplink capped at {ORIGIN_UPLOAD_KIB // 1024} MiB/s, "
                f"initial seeding) serves it"
                + (
                    f", opentracker at {tracker.announce_url}"
                    if tracker
                    else ", peers found through the magnet's hint and peer exchange"
                )
            )
            print(f"torrent_magnet = {magnet}\n")

            procs = [_spawn(f"compute-{i + 1}", server.url, root) for i in range(hosts)]
            started.extend(procs)
            for p in procs:
                p.wait_for("ready", 60)
            print(f"{hosts} compute hosts up on {procs[0].address}..{procs[-1].address}\n")
            print("boot 1 (image not on any host yet):")
            _boot_all(procs, 1, image_id, size)
            print("boot 2 (base copy present: clone):")
            _boot_all(procs, 2, image_id, size)
            origin_upload = seeder.uploaded_bytes()
            from nova_torrent_images.demo.capped_proxy import CappedProxy

            with CappedProxy(server.url, ORIGIN_UPLOAD_KIB * 1024) as proxy:
                print(
                    f"plain HTTP for comparison: the same {hosts} hosts fetch the image from "
                    f"{origin_name} through the same {ORIGIN_UPLOAD_KIB // 1024} MiB/s uplink "
                    "(the same pipeline, mode = none):"
                )
                _boot_all(procs, HTTP_ROUND, image_id, size, glance_url=proxy.url)
                http_sent = proxy.bytes_served
        ok = _print_table(procs, size, origin_upload, http_sent, results)
        return 0 if ok else 1
    finally:
        for item in reversed(started):
            if isinstance(item, HostProcess):
                _stop(item)
            else:
                item.stop()
        if own_dir:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"host logs are in {root}")


def _start_tracker(root: str):
    """Debian's opentracker on 127.0.0.1 when installed (optional: hints work without)."""
    from nova_torrent_images.testing.opentracker import Opentracker, find_binary

    if find_binary() is None:
        return None
    return Opentracker(workdir=os.path.join(root, "tracker")).start()


def _publish(glance_url: str, root: str, image_id: str, tracker):
    """The origin side as an operator runs it: the seeder first, then ``publish``."""
    from nova_torrent_images.testing.origin_node import start_origin_node

    node = start_origin_node(
        glance_url,
        os.path.join(root, "origin-state"),
        upload_kib=ORIGIN_UPLOAD_KIB,
        tracker=tracker,
    )
    magnet = node.publish(image_id)
    if tracker is not None:
        # The first hash the tracker sees (v1, or the truncated v2 of a v2 torrent).
        tracker.wait_allowed(node.publisher.published()[0].tracker_hashes[0], timeout=5)
    return node.seeder, magnet


def _spawn(name: str, glance_url: str, root: str) -> HostProcess:
    address = next_loopback_address()
    workdir = os.path.join(root, name)
    os.makedirs(workdir, exist_ok=True)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nova_torrent_images.demo.compute_host",
            "--name",
            name,
            "--address",
            address,
            "--glance",
            glance_url,
            "--workdir",
            workdir,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    host = HostProcess(name, address, process)
    threading.Thread(target=host.read_events, daemon=True).start()
    return host


def _stop(host: HostProcess) -> None:
    try:
        host.send("stop")
        host.process.wait(timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        host.process.kill()
        host.process.wait()


def _boot_all(
    procs: list[HostProcess], number: int, image_id: str, size: int, glance_url: str = ""
) -> None:
    """Boot ``number`` on every host at once (with ``glance_url``: the plain HTTP fetch)."""
    kind = "http" if glance_url else "boot"
    displays = {p.name: HostProgress(f"  {p.name}", size, position=i) for i, p in enumerate(procs)}
    for p in procs:
        p.send(
            f"http {number} {image_id} {glance_url}" if glance_url else f"boot {number} {image_id}"
        )
    pending = {p.name: p for p in procs}
    deadline = time.monotonic() + BOOT_TIMEOUT
    while pending and time.monotonic() < deadline:
        for name, p in list(pending.items()):
            while True:
                try:
                    event = p.events.get_nowait()
                except queue.Empty:
                    break
                display = displays[name]
                if event["event"] == "progress":
                    display.update(event["done"], event["peers"])
                elif event["event"] == kind:
                    display.finish(event.get("source", "failed"))
                    p.boots[number] = event
                    del pending[name]
                    break
                elif event["event"] == "exit":
                    display.finish("host process exited")
                    p.boots[number] = {"error": "host process exited"}
                    del pending[name]
                    break
        time.sleep(0.1)
    for name, p in pending.items():
        displays[name].finish(f"no answer in {BOOT_TIMEOUT}s")
        p.boots[number] = {"error": f"no answer in {BOOT_TIMEOUT}s"}
    print()


def _print_table(
    procs: list[HostProcess],
    size: int,
    origin_upload: int,
    http_sent: int,
    results: dict | None = None,
) -> bool:
    header = (
        f"{'host':<11} {'address':<11} {'boot 1 via':<10} {'seconds':>7} {'peers MiB':>9} "
        f"{'origin MiB':>10} {'Glance MiB':>10} {'HTTP s':>7} {'boot 2':>9}  verified"
    )
    print(header)
    print("-" * len(header))
    ok = True
    glance_bytes = 0
    torrent_times, http_times = [], []
    for p in procs:
        first, second, plain = (p.boots.get(n, {}) for n in (1, 2, HTTP_ROUND))
        failed = next((b["error"] for b in (first, second, plain) if "error" in b), None)
        if failed or not (first and second and plain):
            ok = False
            print(f"{p.name:<11} {p.address:<11} FAILED: {failed or 'no answer'}")
            continue
        verified = first["verified"] and second["verified"] and plain["verified"]
        ok &= verified
        glance_bytes += first["from_glance"]
        torrent_times.append(first["seconds"])
        http_times.append(plain["seconds"])
        print(
            f"{p.name:<11} {p.address:<11} {first['source']:<10} {first['seconds']:>7.1f} "
            f"{first['from_peers'] / units.Mi:>9.1f} {first['from_origin'] / units.Mi:>10.1f} "
            f"{first['from_glance'] / units.Mi:>10.1f} {plain['seconds']:>7.1f} "
            f"{second['seconds'] * 1000:>7.0f}ms  {'yes' if verified else 'NO'}"
        )
    egress = origin_upload + glance_bytes
    print(
        f"\norigin egress: {egress / units.Mi:.1f} MiB "
        f"(seeder {origin_upload / units.Mi:.1f} + Glance "
        f"HTTP {glance_bytes / units.Mi:.1f}) = {egress / size:.2f}x the image; the plain HTTP "
        f"fleet made Glance send {http_sent / units.Mi:.0f} MiB ({http_sent / size:.2f}x)"
    )
    if torrent_times and http_times:
        last_torrent, last_http = max(torrent_times), max(http_times)
        floor = size / (ORIGIN_UPLOAD_KIB * 1024)
        print(
            f"last host done: torrent {last_torrent:.1f} s, plain HTTP {last_http:.1f} s: "
            f"torrent takes {last_torrent / last_http:.2f} of plain HTTP's time "
            f"(floor, image / uplink: {floor:.1f} s)"
        )
        if results is not None:
            results.update(
                hosts=len(procs),
                size_mib=size // units.Mi,
                cap_mib=ORIGIN_UPLOAD_KIB // 1024,
                torrent_last_seconds=last_torrent,
                http_last_seconds=last_http,
                torrent_over_http=last_torrent / last_http,
                torrent_times=torrent_times,
                http_times=http_times,
                origin_egress=egress / size,
                http_origin_egress=http_sent / size,
                sources=sorted({p.boots[1].get("source", "?") for p in procs}),
                verified=ok,
            )
    return ok
