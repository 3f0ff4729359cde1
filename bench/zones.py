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

"""The zones row: 3 zones x 4 hosts sharing one Glance, beside the same 12 hosts as one zone.

Each zone has a 127.0.12Z.0/24 range, its own opentracker and its own origin node
(``origin_zone``, capped like the scale rows' origin); its hosts (``zone``) run the fleet
benchmark's host process (``fleet_host.py``: ``fetch_to_file``, the one pipeline). What
crossed zones is counted from each host's own figures (bytes per peer and per origin
stripe server). Glance's bytes are the origins' publishes (one copy per zone) and any the
hosts read themselves. The one-zone run is ``fleet._torrent_fleet`` as in the scale rows.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import sys
import tempfile
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fleet  # noqa: E402
from common import MiB, write_image  # noqa: E402

from nova_torrent_images.testing.http_origin import HTTPOrigin  # noqa: E402
from nova_torrent_images.testing.origin_node import start_origin_node  # noqa: E402


def _network(zone: int) -> ipaddress.IPv4Network:
    return ipaddress.ip_network(f"127.0.{120 + zone}.0/24")


def _zone_of(address: str | None, zones: int) -> int | None:
    ip = ipaddress.ip_address(address or "0.0.0.0")
    return next((z for z in range(zones) if ip in _network(z)), None)


def crossed(host: dict, zone: int, zones: int) -> int:
    """Bytes one host got from outside its zone: other zones' peers and stripe servers."""
    n = 0
    for endpoint, got in (host.get("per_peer") or {}).items():
        if _zone_of(endpoint.rpartition(":")[0].strip("[]"), zones) != zone:
            n += got
    for url, got in (host.get("per_stripe_server") or {}).items():
        if _zone_of(urllib.parse.urlsplit(url).hostname, zones) != zone:
            n += got
    return n


def _zoned_fleet(origin, image_id: str, root: str, zones: int, per_zone: int, cap_mib: int):
    from nova_torrent_images.testing.opentracker import Opentracker

    size, cap = origin.images[image_id]["size"], cap_mib * MiB
    trackers, nodes = [], []
    try:
        glance_before = origin.bytes_served
        origin.limiter.rate = 0  # the publishes are not part of the run (as _torrent_fleet)
        for z in range(zones):
            tracker = Opentracker(
                workdir=os.path.join(root, f"tracker-{z}"), host=str(_network(z)[1])
            ).start()
            trackers.append(tracker)
            node = start_origin_node(
                origin.url,
                os.path.join(root, f"origin-zone-{z}"),
                upload_kib=cap_mib * 1024,
                tracker=tracker,
                address=str(_network(z)[2]),
                zone=f"zone-{z}",
            )
            nodes.append(node)
            node.publish(image_id)
            tracker.wait_allowed(node.publisher.published()[0].tracker_hashes[0], timeout=5)
        publish_bytes = origin.bytes_served - glance_before
        origin.limiter.rate = cap
        placement = [
            (str(_network(z)[10 + i]), (f"zone=zone-{z}",))
            for z in range(zones)
            for i in range(per_zone)
        ]
        glance_before = origin.bytes_served
        run = fleet.run_hosts(
            zones * per_zone,
            root,
            origin.url,
            image_id,
            cap_kib=cap_mib * 1024,
            mode="torrent",
            egress=lambda: sum(n.seeder.uploaded_bytes() for n in nodes) + origin.bytes_served,
            prefix="zones",
            placement=placement,
        )
        hosts_glance = origin.bytes_served - glance_before
    finally:
        for node in nodes:
            node.stop()
            node.publisher.unpublish(image_id)
        for tracker in trackers:
            tracker.stop()
    summary = fleet._summary(run, size, size / cap, detail=False)
    per_zone_crossed = [0] * zones
    for i, host in enumerate(run["per_host"]):
        per_zone_crossed[i // per_zone] += crossed(host, i // per_zone, zones)
    summary["cross_zone_over_image"] = round(sum(per_zone_crossed) / size, 3)
    summary["cross_zone_per_zone"] = [round(c / size, 3) for c in per_zone_crossed]
    summary["glance_publish_over_image"] = round(publish_bytes / size, 3)
    summary["glance_over_image"] = round(hosts_glance / size, 3)
    summary["stripes_zones"] = sorted({h.get("stripes_zone") or "" for h in run["per_host"]})
    return summary


def zones_row(zones: int = 3, per_zone: int = 4, size_mib: int = 64, cap_mib: int = 16) -> dict:
    """``zones`` x ``per_zone`` hosts, each zone with its own origin and tracker, beside the
    same hosts as one zone (one origin, one tracker)."""
    from nova_torrent_images.testing.opentracker import find_binary

    if find_binary() is None:
        return {"skipped": "opentracker is not installed (one tracker per zone)"}
    root = tempfile.mkdtemp(prefix="nti-bench-zones-")
    size = size_mib * MiB
    image_path = os.path.join(root, "image.raw")
    write_image(image_path, size)
    out: dict = {
        "zones": zones,
        "hosts_per_zone": per_zone,
        "size_mib": size_mib,
        "cap_mib": cap_mib,
        "floor": size / (cap_mib * MiB),
    }
    tracker_node = None
    try:
        with HTTPOrigin(os.path.join(root, "glance"), upload_rate=cap_mib * MiB) as origin:
            image_id = origin.create_image(image_path, name="bench-zones")["id"]
            os.unlink(image_path)
            out["zoned"] = _zoned_fleet(origin, image_id, root, zones, per_zone, cap_mib)
            fleet._clean(root, "zones", zones * per_zone)
            tracker_node = fleet._start_tracker(root)
            out["one_zone"] = fleet._torrent_fleet(
                origin, image_id, root, zones * per_zone, cap_mib, tracker_node, "one-zone",
                "file", False,
            )  # fmt: skip
        return out
    finally:
        if tracker_node is not None:
            tracker_node.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    import json

    print(json.dumps(zones_row(), indent=1))
