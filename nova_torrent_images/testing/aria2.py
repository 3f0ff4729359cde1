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

"""A standard BitTorrent client beside this project's hosts: Debian's aria2c.

Tests and benchmarks use it to show what a client that is not this project's sees of the
origin (its BitTorrent port, no stripes), and what a peer client costs per byte on the
same machine. aria2 1.36 reads v1 torrents only (it misreads hybrid ones, see
doc/source/origin.rst). Each client binds its own 127.0.0.x (``--interface``) and finds
the others through the tracker; DHT, local peer discovery and every outside service are
off.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass

from nova_torrent_images.testing.swarm import next_loopback_address


def find_binary() -> str | None:
    return shutil.which("aria2c")


@dataclass
class Aria2Result:
    """One aria2c download: how it went and what it cost."""

    returncode: int
    seconds: float  # from start to exit
    cpu_seconds: float  # user + system of the aria2c process
    path: str | None  # the downloaded file
    log: str


def command(
    torrent: str,
    directory: str,
    *,
    tracker: str,
    address: str,
    download_kib: int = 0,
    upload_kib: int = 0,
    seed_seconds: float = 0,
    log: str | None = None,
) -> list[str]:
    """The aria2c command line of one simulated host."""
    args = [
        find_binary() or "aria2c",
        f"--dir={directory}",
        f"--bt-tracker={tracker}",
        f"--interface={address}",
        "--enable-dht=false",
        "--enable-dht6=false",
        "--bt-enable-lpd=false",
        "--enable-peer-exchange=true",
        "--disable-ipv6=true",
        "--check-certificate=false",
        "--file-allocation=none",
        "--console-log-level=warn",
        "--summary-interval=0",
        "--bt-hash-check-seed=false",
        "--bt-seed-unverified=true",
        # Peers on loopback: many per address would be refused otherwise.
        "--bt-max-peers=0",
        f"--max-overall-download-limit={download_kib}K",
        f"--max-overall-upload-limit={upload_kib}K",
        f"--seed-time={seed_seconds / 60:.4f}",
    ]
    if log:
        args += [f"--log={log}", "--log-level=info"]
    return [*args, torrent]


def fetch(
    torrent: str, directory: str, *, tracker: str, timeout: float = 120.0, **kwargs: object
) -> Aria2Result:
    """Run one aria2c to completion (it leaves once done: seed time 0)."""
    os.makedirs(directory, exist_ok=True)
    address = kwargs.pop("address", None) or next_loopback_address()
    args = command(torrent, directory, tracker=tracker, address=address, **kwargs)
    start = time.monotonic()
    before = os.times()
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    after = os.times()
    seconds = time.monotonic() - start
    cpu = (after.children_user - before.children_user) + (
        after.children_system - before.children_system
    )
    files = [
        os.path.join(directory, f)
        for f in os.listdir(directory)
        if not f.endswith(".aria2") and os.path.isfile(os.path.join(directory, f))
    ]
    return Aria2Result(
        proc.returncode, seconds, cpu, files[0] if files else None, proc.stdout + proc.stderr
    )
