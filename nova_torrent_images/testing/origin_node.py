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

"""A Glance node's origin side for demos and benchmarks: seeder first, then ``publish``.

The same steps an operator runs on a Glance node (``nova-torrent-images seed`` and
``publish``), in one process, bound to its own 127.0.0.x address.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from oslo_config import cfg

from nova_torrent_images import exception
from nova_torrent_images.glance.client import GlanceClient
from nova_torrent_images.origin.publisher import Publisher
from nova_torrent_images.origin.seeder import OriginSeeder
from nova_torrent_images.testing.swarm import make_conf, next_loopback_address


@dataclass
class OriginNode:
    conf: cfg.ConfigOpts
    glance: GlanceClient
    publisher: Publisher
    seeder: OriginSeeder

    def publish(self, image_id: str, timeout: float = 60.0) -> str:
        """Publish ``image_id``, wait until the seeder serves it; return the magnet."""
        self.publisher.publish(image_id)
        deadline = time.monotonic() + timeout
        while image_id not in self.seeder.seeded():
            if time.monotonic() > deadline:
                raise exception.TorrentImagesError(
                    f"the origin seeder did not pick up image {image_id} in {timeout:.0f}s"
                )
            time.sleep(0.1)
        return self.glance.get_image(image_id)["torrent_magnet"]

    def stop(self) -> None:
        self.seeder.stop()


def start_origin_node(
    glance_url: str,
    state_dir: str,
    *,
    upload_kib: int,
    tracker=None,
    super_seeding: bool | str = "auto",
    torrent_format: str | None = None,
    stripes: bool = True,
    address: str | None = None,
    zone: str | None = None,
) -> OriginNode:
    """Start an origin seeder (uplink capped at ``upload_kib``) advertising itself.

    With ``stripes`` it also serves stripes on the same address (the uplink cap applies
    to each of the two), and ``publish`` names them in the image.
    """
    address = address or next_loopback_address()
    settings = {
        "glance_endpoint": glance_url,
        "glance_noauth": True,
        "origin_state_dir": state_dir,
        "origin_upload_rate_limit": upload_kib,
        "origin_super_seeding": str(super_seeding).lower(),
        "origin_check_interval": 0,
        "listen_interfaces": [f"{address}:0"],
    }
    if torrent_format is not None:
        settings["origin_torrent_format"] = torrent_format
    if stripes:
        settings["origin_stripe_listen"] = f"{address}:0"
    if zone is not None:
        settings["origin_zone"] = zone
    if tracker is not None:
        settings.update(
            origin_trackers=[tracker.announce_url],
            tracker_whitelist_path=tracker.whitelist_path,
            tracker_pidfile=tracker.pidfile_path,
        )
    conf = make_conf(**settings)
    glance = GlanceClient.for_endpoint(glance_url, conf)
    publisher = Publisher(conf, glance)
    seeder = OriginSeeder(conf, publisher=publisher).start_in_thread()
    host, port = seeder.endpoint
    # The seeder's own address goes into every magnet as the x.pe hint.
    conf.set_override("origin_advertise_addresses", [f"{host}:{port}"], group="torrent_images")
    if seeder.stripes is not None:
        conf.set_override("origin_stripe_advertise", [seeder.stripes.url], group="torrent_images")
    return OriginNode(conf, glance, publisher, seeder)
