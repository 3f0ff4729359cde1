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

"""libvirt integration: the host that saved a snapshot keeps it as a base copy.

Nova's libvirt driver saves a snapshot by extracting the disk into a file and handing the
open file to ``GlanceImageServiceV2.update(..., data=file)``, which sends it with
``_upload_data(context, image_id, data)`` and reads the record back. :func:`install` wraps
``_upload_data`` (as :mod:`.glance_download` wraps ``download``): after Nova's upload, when
Glance's size and ``os_hash_value`` are those of the file (hashed here, locally), a copy
(a reflink where the filesystem can) becomes the image's base copy in the filesystem store,
with the record kept beside it. A restore on this host then links it into Nova's cache and
reads nothing from Glance. Nothing here ever fails Nova's snapshot: problems are logged.
"""

from __future__ import annotations

import functools
import hashlib
import os
import stat
from collections.abc import Callable
from typing import Any

from nova.image import glance as nova_glance
from oslo_log import log as logging

from nova_torrent_images.image import parse_image

LOG = logging.getLogger(__name__)

_TARGET = nova_glance.GlanceImageServiceV2
_ORIGINAL_ATTR = "_nova_torrent_images_original"


def keep_snapshot(hook: Any, context: Any, image_id: str, data: Any, record: Any) -> bool:
    """Keep the uploaded file ``data`` as the base copy of ``image_id``; never raises."""
    try:
        path = getattr(data, "name", None)
        if not isinstance(path, str) or not stat.S_ISREG(os.stat(path).st_mode):
            return False
        conf = hook.conf.torrent_images
        image = parse_image(
            dict(record),
            torrentable_property=conf.torrentable_property,
            magnet_property=conf.magnet_property,
        )
        if not image.hash_algo or not image.hash_value or image.size != os.path.getsize(path):
            LOG.info("Image %s: Glance's record does not describe %s; not kept", image_id, path)
            return False
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, image.hash_algo).hexdigest()
        if digest != image.hash_value:
            LOG.warning(
                "Image %s: Glance's %s hash differs from the snapshot file %s; not kept",
                image_id,
                image.hash_algo,
                path,
            )
            return False
        base = hook.pipeline().adopt_disk(image, path, getattr(context, "project_id", None))
        LOG.info("Image %s: the snapshot is kept as base copy %s", image_id, base.ref)
        return True
    except Exception:  # noqa: BLE001  the snapshot is in Glance; only the local copy is lost
        LOG.warning("Image %s: snapshot uploaded, but not kept here", image_id, exc_info=True)
        return False


def _wrap(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def _upload_data(
        self: nova_glance.GlanceImageServiceV2, context: Any, image_id: str, data: Any
    ) -> Any:
        record = original(self, context, image_id, data)
        from nova_torrent_images.nova_hooks import glance_download

        hook = glance_download.installed()
        if hook is not None and record is not None:
            keep_snapshot(hook, context, image_id, data, record)
        return record

    setattr(_upload_data, _ORIGINAL_ATTR, original)
    return _upload_data


def install() -> None:
    """Wrap Nova's snapshot upload (idempotent); done by ``glance_download.install``."""
    if not hasattr(_TARGET._upload_data, _ORIGINAL_ATTR):
        _TARGET._upload_data = _wrap(_TARGET._upload_data)


def uninstall() -> None:
    original = getattr(_TARGET._upload_data, _ORIGINAL_ATTR, None)
    if original is not None:
        _TARGET._upload_data = original
