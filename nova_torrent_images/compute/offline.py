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
"""Boots while Glance is unreachable: who may boot which kept base copy, and for how long.

The record Glance sent with an image is kept with its base copy (the store's metadata).
While Glance answers, it is the authority; while it does not, only that kept record can
stand in, never widening who may boot the image.
"""

from __future__ import annotations

import time

from oslo_config import cfg
from oslo_log import log as logging

from nova_torrent_images import exception
from nova_torrent_images.compute.stores.base import BaseCopyStore
from nova_torrent_images.glance.image import ImageInfo, parse_image

LOG = logging.getLogger(__name__)


def offline_image(
    store: BaseCopyStore,
    conf: cfg.ConfigOpts,
    image_id: str,
    project_id: str | None,
    glance_error: Exception,
    max_age: float,
) -> ImageInfo:
    """The image as Glance last showed it, for a boot while Glance is unreachable.

    Only a verified base copy on this host can stand in, within ``offline_boot_max_age``
    (``max_age``) of its verification, and only for a project Glance showed the image to
    (its owner, a project that booted it before, anyone for a public or community image):
    a cached record never widens who may boot an image. Raises
    :class:`~nova_torrent_images.exception.OfflineBootRefused` otherwise.
    """

    def refuse(reason: str) -> exception.OfflineBootRefused:
        return exception.OfflineBootRefused(
            image_id=image_id, reason=reason, glance_error=glance_error
        )

    if not max_age:
        raise refuse("boots without Glance are disabled")
    base = store.lookup(image_id) if store.capabilities.keeps_base_copies else None
    if base is None or not base.record:
        raise refuse(f"this host has no verified base copy of it in {store.name}")
    age = time.time() - base.created_at
    if age > max_age:
        raise refuse(
            f"its base copy was verified {age:.0f}s ago, more than offline_boot_max_age={max_age}s"
        )
    record = base.record
    visible = record.get("visibility") in ("public", "community")
    if not visible and (not project_id or project_id not in (record.get("owner"), *base.projects)):
        raise refuse(
            f"Glance never showed it to project {project_id} on this host, and it is "
            f"{record.get('visibility') or 'not public'}"
        )
    opts = conf.torrent_images
    image = parse_image(
        record,
        torrentable_property=opts.torrentable_property,
        magnet_property=opts.magnet_property,
    )
    image.offline = True
    LOG.warning(
        "Image %s: Glance is unreachable (%s); booting the base copy %s verified %.0fs "
        "ago, with the Glance record kept with it",
        image_id,
        glance_error,
        base.ref,
        age,
    )
    return image
