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

"""Whether an image goes by torrent: the decision and the reason for it, for the log."""

from __future__ import annotations

from dataclasses import dataclass

from oslo_config import cfg
from oslo_utils import units

from nova_torrent_images.glance.image import ImageInfo


@dataclass(frozen=True)
class Decision:
    use_torrent: bool
    reason: str

    def __bool__(self) -> bool:
        return self.use_torrent


def decide(
    image: ImageInfo, conf: cfg.ConfigOpts, *, disk_formats: tuple[str, ...] | None = None
) -> Decision:
    """Decide how ``image`` is delivered under ``[torrent_images]`` settings.

    ``disk_formats`` restricts torrent delivery to formats the destination can take as they
    are (a XenServer VDI takes only ``raw``); ``None`` accepts any format.
    """
    opts = conf.torrent_images
    if opts.mode == "none":
        return Decision(False, "[torrent_images] mode is none")
    if image.torrent_error is not None:
        return Decision(False, str(image.torrent_error))
    if image.is_torrentable is False:
        return Decision(False, f"{opts.torrentable_property} is false")
    if opts.mode == "some" and image.is_torrentable is not True:
        return Decision(
            False, f"{opts.torrentable_property} is not set and [torrent_images] mode is some"
        )
    if image.magnet is None:
        return Decision(False, f"the image has no {opts.magnet_property} property")
    if image.status not in (None, "active"):
        return Decision(False, f"the image is {image.status}, not active")
    if disk_formats is not None and image.disk_format not in disk_formats:
        return Decision(
            False,
            f"disk format {image.disk_format} cannot be written straight into "
            f"the destination (accepted: {', '.join(disk_formats)})",
        )
    floor = opts.min_torrent_image_size * units.Mi
    if image.size is not None and image.size < floor:
        return Decision(
            False,
            f"the image ({image.size} bytes) is smaller than "
            f"[torrent_images] min_torrent_image_size ({opts.min_torrent_image_size} MiB)",
        )
    return Decision(
        True,
        f"{opts.torrentable_property}={image.is_torrentable}, mode "
        f"{opts.mode}, info-hash {image.magnet.best_hash}",
    )
