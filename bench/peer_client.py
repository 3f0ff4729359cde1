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

"""A peer client measured beside the product: Debian's aria2c, one process per host.

The same image bytes are published again as a v1 torrent (aria2 1.36 reads no other)
by an origin node of the same kind as the product's, from the same Glance-like origin and
under the same uplink cap; every aria2c binds its own 127.0.0.x, has the same downlink
cap as a product host and finds the others through the same opentracker. A host is done
when aria2 reports its download complete (``--on-bt-download-complete``); it keeps
seeding until every host is done, as the product's hosts stay up. CPU is read from
/proc for each aria2c from the start to the last host done.

``ensure_aria2c`` installs Debian's ``aria2`` when it is missing and this process may
(root), and says why not otherwise: the rows are then left out, not faked.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import MiB, ProcessThreads, context_switches, read_io  # noqa: E402

from nova_torrent_images.testing import aria2  # noqa: E402
from nova_torrent_images.testing.origin_node import start_origin_node  # noqa: E402
from nova_torrent_images.testing.swarm import next_loopback_address  # noqa: E402

_TICK = os.sysconf("SC_CLK_TCK")
HOOK = """#!/bin/sh
# aria2 calls this once a BitTorrent download is complete (GID, files, path).
date +%s.%N > "$3.done.tmp" && mv "$3.done.tmp" "$3.done"
"""


def ensure_aria2c() -> str | None:
    """None when aria2c is there (installed now if need be), else why it is not."""
    if aria2.find_binary() is not None:
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "aria2c is not installed (Debian package aria2) and this process cannot install it"
    proc = subprocess.run(
        ["apt-get", "install", "-y", "-qq", "aria2"],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )
    if proc.returncode != 0 or aria2.find_binary() is None:
        return f"installing aria2 failed: {proc.stderr.strip()[-300:]}"
    print("bench: installed Debian's aria2 for the peer-client rows", flush=True)
    return None


def _cpu(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, IndexError, ValueError):
        return 0.0


class V1Origin:
    """The image's bytes published as a v1 torrent by an origin node of their own."""

    def __init__(self, origin, image_path: str, root: str, *, cap_kib: int, tracker) -> None:
        self.record = origin.create_image(image_path, name="bench-peer-client")
        self.node = start_origin_node(
            origin.url,
            os.path.join(root, "origin-state-aria2"),
            upload_kib=cap_kib,
            tracker=tracker,
            torrent_format="v1",
        )
        limiter_rate = origin.limiter.rate
        origin.limiter.rate = 0  # publishing reads the image once: not part of the run
        try:
            self.node.publish(self.record["id"])
        finally:
            origin.limiter.rate = limiter_rate
        entry = self.node.publisher.registry.get(self.record["id"])
        tracker.wait_allowed(self.node.publisher.published()[0].tracker_hashes[0], timeout=5)
        self.torrent = os.path.join(root, "aria2.torrent")
        with open(self.torrent, "wb") as f:
            f.write(self.node.publisher.registry.read_torrent(entry))
        self.sha512 = self.record["os_hash_value"]
        self.size = self.record["size"]

    def egress(self) -> int:
        return self.node.seeder.uploaded_bytes()

    def stop(self) -> None:
        self.node.stop()


def run_fleet(
    n: int, v1: V1Origin, root: str, *, tracker_url: str, cap_kib: int, timeout: float = 600
) -> dict:
    """``n`` aria2c hosts at once; times relative to their start."""
    hook = os.path.join(root, "aria2-done.sh")
    with open(hook, "w") as f:
        f.write(HOOK)
    os.chmod(hook, 0o755)
    procs, dirs = [], []
    threads = ProcessThreads()  # aria2c's CPU by thread, as fleet_host.py has ours
    io: dict[str, int] = {}
    before = v1.egress()
    t0 = time.time()
    for i in range(n):
        directory = os.path.join(root, f"aria2-{i}")
        shutil.rmtree(directory, ignore_errors=True)  # a run before left its done marker
        os.makedirs(directory)
        args = aria2.command(
            v1.torrent,
            directory,
            tracker=tracker_url,
            address=next_loopback_address(),
            download_kib=cap_kib,
            seed_seconds=24 * 3600,  # stays until told: the product's hosts stay up too
            log=os.path.join(directory, "aria2.log"),
        )
        args.insert(-1, f"--on-bt-download-complete={hook}")
        with open(os.path.join(directory, "stdout.log"), "w") as out:
            procs.append(subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT))
        threads.add(procs[-1].pid)
        dirs.append(directory)
    done: dict[int, float] = {}
    cpu = 0.0
    try:
        deadline = time.monotonic() + timeout
        while len(done) < n and time.monotonic() < deadline:
            for i, directory in enumerate(dirs):
                if i in done:
                    continue
                marks = [m for m in os.listdir(directory) if m.endswith(".done")]
                if marks:
                    with open(os.path.join(directory, marks[0])) as f:
                        done[i] = float(f.read().strip()) - t0  # written whole (mv)
                elif procs[i].poll() is not None:
                    raise RuntimeError(f"aria2c {i} exited with {procs[i].returncode}")
            time.sleep(0.05)
        cpu = sum(_cpu(p.pid) for p in procs)
        by_thread = threads.stop()
        for p in procs:
            for key, value in {**read_io(p.pid), "ctxsw": context_switches(p.pid)}.items():
                io[key] = io.get(key, 0) + value
        sent = v1.egress() - before
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    if len(done) < n:
        raise RuntimeError(f"only {len(done)} of {n} aria2c hosts finished in {timeout:.0f}s")
    for directory in dirs:
        path = next(
            os.path.join(directory, f)
            for f in os.listdir(directory)
            if not f.endswith((".done", ".tmp", ".aria2", ".log"))
        )
        with open(path, "rb") as f:
            if hashlib.file_digest(f, "sha512").hexdigest() != v1.sha512:
                raise RuntimeError(f"aria2c delivered a corrupt image in {directory}")
        os.unlink(path)
    times = sorted(done.values())
    gib = n * v1.size / (1024 * MiB)
    image_bytes = n * v1.size
    return {
        "thread_cpu_s_per_gib": {
            name: round(used / gib, 2)
            for name, used in sorted(by_thread.items(), key=lambda item: -item[1])
            if used / gib >= 0.005
        },
        "io": {
            "file_read_per_image_byte": round(io.get("rchar", 0) / image_bytes, 2),
            "file_written_per_image_byte": round(io.get("wchar", 0) / image_bytes, 2),
            "write_calls_per_mib": round(io.get("syscw", 0) / (image_bytes / MiB)),
            "read_calls_per_mib": round(io.get("syscr", 0) / (image_bytes / MiB)),
            "context_switches_per_mib": round(io.get("ctxsw", 0) / (image_bytes / MiB), 1),
        },
        "done_times": [round(t, 3) for t in times],
        "seconds": round(times[-1], 3),
        "egress_bytes": sent,
        "cpu_seconds": round(cpu, 2),
        "cpu_s_per_gib": round(cpu / (n * v1.size / (1024 * MiB)), 3),
    }
