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
"""Snapshots: bytes to Glance and time, differential against full, and the restore elsewhere.

A real glance-api (file store) and the XenAPI handler on two fake XAPI hosts: the saving
host boots image P, the instance changes ``--changed`` of it (in 1 MiB runs spread over the
disk), then the same disk is uploaded whole and as a delta (``differential_snapshots``). A
second host that already has P restores the differential snapshot; the bytes it reads from
Glance are counted and the restored disk is checked against the whole-image hash.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nova_torrent_images.glance.client import GlanceClient  # noqa: E402
from nova_torrent_images.testing.fake_xenapi import FakeXenAPI, GiB  # noqa: E402
from nova_torrent_images.testing.swarm import make_conf  # noqa: E402
from nova_torrent_images.virt.xenapi.handler import GlanceImageHandler  # noqa: E402

MiB = 1024 * 1024


class CountingGlance:
    """A GlanceClient counting the image bytes it reads."""

    def __init__(self, glance: GlanceClient) -> None:
        self.glance = glance
        self.bytes_read = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.glance, name)

    def iter_data(self, image_id: str):
        for chunk in self.glance.iter_data(image_id):
            self.bytes_read += len(chunk)
            yield chunk

    def download(self, image, destination, **kwargs):
        return GlanceClient.download(self, image, destination, **kwargs)


def _write_random(path: str, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 8 * MiB)
            f.write(os.urandom(n))
            left -= n


def _change(path: str, size: int, fraction: float) -> None:
    """Overwrite ``fraction`` of the file in 1 MiB runs spread evenly over it."""
    runs = max(1, int(size * fraction) // MiB)
    stride = size // runs
    with open(path, "r+b") as f:
        for i in range(runs):
            f.seek(i * stride)
            f.write(os.urandom(MiB))


def _vdi_path(fake: FakeXenAPI, uuid: str) -> str:
    ref = [r for r in fake.all_refs("VDI") if fake.get_record("VDI", r)["uuid"] == uuid][0]
    return str(fake.vdi_path(ref))


def _sha512(path: str, size: int) -> str:
    h = hashlib.sha512()
    with open(path, "rb") as f:
        left = size
        while left:
            chunk = f.read(min(left, 4 * MiB))
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


class _Host:
    def __init__(self, root: str, name: str, glance_url: str, sr_size: int) -> None:
        self.fake = FakeXenAPI.create(
            os.path.join(root, name), sr_size=sr_size, use_loop_devices=False
        )
        self.session = self.fake.session()
        self.conf = make_conf(state_dir=os.path.join(root, f"{name}-state"))
        self.fake.configure(self.conf)
        self.glance = CountingGlance(GlanceClient.for_endpoint(glance_url, self.conf))
        self.handler = GlanceImageHandler(self.conf, glance_factory=lambda c: self.glance)

    def close(self) -> None:
        self.handler.shutdown()
        self.session.xenapi.session.logout()
        self.fake.close()


def measure(server: Any, root: str, size: int, changed: float) -> dict[str, Any]:
    """One run against the running glance-api ``server``; the results as a dict."""
    client = server.client()
    parent_path = os.path.join(root, "parent.raw")
    _write_random(parent_path, size)
    parent = server.create_image(parent_path, name="bench-parent")
    os.unlink(parent_path)
    sr_size = 6 * size + GiB
    saver = _Host(root, "saver", server.url, sr_size)
    other = _Host(root, "other", server.url, sr_size)
    created = [parent["id"]]
    try:
        root_uuid = saver.handler.download_image(None, saver.session, {"name": "vm"}, parent["id"])[
            "root"
        ]["uuid"]
        disk = _vdi_path(saver.fake, root_uuid)
        _change(disk, size, changed)
        whole_hash = _sha512(disk, os.path.getsize(disk))
        rows = {}
        for mode in ("full", "differential"):
            saver.conf.set_override(
                "differential_snapshots", mode == "differential", group="torrent_images"
            )
            snap = client.images.create(
                name=f"bench-{mode}", disk_format="raw", container_format="bare"
            )["id"]
            created.append(snap)
            t0 = time.monotonic()
            saver.handler.upload_image(None, saver.session, {"name": "vm"}, snap, [root_uuid])
            seconds = time.monotonic() - t0
            record = dict(client.images.get(snap))
            rows[mode] = {
                "image_id": snap,
                "bytes_to_glance": int(record["size"]),
                "fraction_of_image": int(record["size"]) / size,
                "seconds": round(seconds, 3),
                "disk_format": record["disk_format"],
            }
        # The restoring host already has P (it booted it before).
        other.handler.download_image(None, other.session, {"name": "p"}, parent["id"])
        before = other.glance.bytes_read
        t0 = time.monotonic()
        restored = other.handler.download_image(
            None, other.session, {"name": "restored"}, rows["differential"]["image_id"]
        )["root"]["uuid"]
        restore_seconds = time.monotonic() - t0
        restored_path = _vdi_path(other.fake, restored)
        restored_hash = _sha512(restored_path, os.path.getsize(disk))
        # On the saving host a restore reads nothing from Glance.
        before_saver = saver.glance.bytes_read
        saver.handler.download_image(
            None, saver.session, {"name": "again"}, rows["differential"]["image_id"]
        )
        return {
            "image_bytes": size,
            "changed": changed,
            "upload": rows,
            "restore_elsewhere": {
                "bytes_from_glance": other.glance.bytes_read - before,
                "fraction_of_image": (other.glance.bytes_read - before) / size,
                "seconds": round(restore_seconds, 3),
                "hash_ok": restored_hash == whole_hash,
            },
            "restore_on_saving_host_bytes_from_glance": saver.glance.bytes_read - before_saver,
        }
    finally:
        saver.close()
        other.close()
        for image_id in created:
            client.images.delete(image_id)


def run(size_mib: int = 256, changed: float = 0.05) -> dict[str, Any]:
    """One run with a glance-api of its own (for run_all.py)."""
    from nova_torrent_images.testing.glance_server import GlanceServer

    root = tempfile.mkdtemp(prefix="bench-snapshots-")
    try:
        with GlanceServer(workdir=os.path.join(root, "glance")) as server:
            return measure(server, root, size_mib * MiB, changed)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def row(result: dict[str, Any]) -> str:
    """The RESULTS.md row: differential against full, and the restore elsewhere."""
    full, diff = result["upload"]["full"], result["upload"]["differential"]
    restore = result["restore_elsewhere"]
    ok = (
        diff["fraction_of_image"] < 0.10
        and restore["fraction_of_image"] < 0.10
        and restore["hash_ok"]
        and result["restore_on_saving_host_bytes_from_glance"] == 0
    )
    return (
        f"| snapshot, {result['image_bytes'] // MiB} MiB, {result['changed']:.0%} changed: "
        f"bytes to Glance | differential {diff['bytes_to_glance'] / MiB:.1f} MiB "
        f"({diff['fraction_of_image']:.1%}) in {diff['seconds']:.2f} s, full "
        f"{full['bytes_to_glance'] / MiB:.1f} MiB in {full['seconds']:.2f} s; restore on "
        f"another host {restore['bytes_from_glance'] / MiB:.1f} MiB from Glance, hash "
        f"{'ok' if restore['hash_ok'] else 'MISMATCH'}; on the saving host "
        f"{result['restore_on_saving_host_bytes_from_glance']} bytes | < 10% | "
        f"{'met' if ok else '**missed**'} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="image size in MiB")
    parser.add_argument("--changed", type=float, default=0.05, help="fraction changed")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    result = run(args.size, args.changed)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"snapshot of a {args.size} MiB image, {args.changed:.0%} changed")
    print(f"{'mode':<14} {'MiB to Glance':>14} {'of image':>9} {'seconds':>8}")
    for mode, upload in result["upload"].items():
        print(
            f"{mode:<14} {upload['bytes_to_glance'] / MiB:>14.1f} "
            f"{upload['fraction_of_image']:>9.1%} {upload['seconds']:>8.2f}"
        )
    r = result["restore_elsewhere"]
    print(
        f"restore on another host with the parent: {r['bytes_from_glance'] / MiB:.1f} MiB "
        f"from Glance ({r['fraction_of_image']:.1%}), {r['seconds']:.2f}s, "
        f"hash {'ok' if r['hash_ok'] else 'MISMATCH'}"
    )
    print(
        "restore on the saving host: "
        f"{result['restore_on_saving_host_bytes_from_glance']} bytes from Glance"
    )
    print(row(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
