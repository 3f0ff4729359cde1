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

"""nova-compute stays responsive while it downloads: the hub's lateness, idle and busy.

A 512 MiB download (a lone host, the landing path; and a fleet of 4 hosts) inside a
process that runs a 10 ms ticker the way nova-compute's RPC handling and heartbeat share
its hub: under eventlet (monkey-patched, a green thread) and under native threads (Nova's
newer mode). Each host is a process of its own (``bench/hub_host.py``) on its own
127.0.0.x; the origin node and the Glance-like origin run in this process, uplink
uncapped (the lone host's worst case: the fastest download). Targets, with the defaults:
p99 under 20 ms and max under 200 ms during the download.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from common import MiB, write_image  # noqa: E402

from nova_torrent_images.testing.http_origin import HTTPOrigin
from nova_torrent_images.testing.origin_node import start_origin_node
from nova_torrent_images.testing.swarm import next_loopback_address

HOST_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hub_host.py")


def _hosts(mode: str, n: int, origin_url: str, image_id: str, root: str) -> list[dict]:
    start_at = time.time() + 12  # every host starts its download at once, after its idle phase
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                HOST_SCRIPT,
                mode,
                "--glance",
                origin_url,
                "--image",
                image_id,
                "--address",
                next_loopback_address(),
                "--out",
                os.path.join(root, f"{mode}-{n}-{i}.raw"),
                "--start-at",
                str(start_at),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(n)
    ]
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"hub host ({mode}) failed: exit {proc.returncode}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def _worst(rows: list[dict], phase: str) -> dict:
    """Across hosts: the worst of each figure."""
    keys = ("p50", "p99", "max")
    return {k: max(r[phase][k] for r in rows if r[phase][k] is not None) for k in keys}


def run(size_mib: int = 512, fleet: int = 4) -> dict:
    root = tempfile.mkdtemp(prefix="nti-bench-hub-")
    image_path = os.path.join(root, "image.raw")
    write_image(image_path, size_mib * MiB)
    out: dict = {"size_mib": size_mib, "fleet_hosts": fleet, "tick_ms": 10}
    with HTTPOrigin(os.path.join(root, "glance")) as origin:
        image_id = origin.create_image(image_path, name="bench-hub")["id"]
        os.unlink(image_path)
        for mode in ("eventlet", "native"):
            for key, n in (("lone", 1), ("fleet", fleet)):
                # A fresh origin node (a fresh dispenser) for every run, as in fleet.py.
                state = os.path.join(root, f"origin-{mode}-{key}")
                node = start_origin_node(origin.url, state, upload_kib=0)
                try:
                    node.publish(image_id)
                    rows = _hosts(mode, n, origin.url, image_id, root)
                finally:
                    node.stop()
                    node.publisher.unpublish(image_id)
                out.setdefault(mode, {})[key] = {
                    "idle": _worst(rows, "idle"),
                    "download": _worst(rows, "download"),
                    "seconds": max(r["seconds"] for r in rows),
                    "sources": sorted({r["source"] for r in rows}),
                }
                print(json.dumps({mode: {key: out[mode][key]}}), flush=True)
    return out


if __name__ == "__main__":
    print(json.dumps(run(int(sys.argv[1]) if len(sys.argv) > 1 else 512), indent=1))
