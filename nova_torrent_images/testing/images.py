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

"""Glance image records for tests: an active raw image whose hash is its data's."""

from __future__ import annotations

import hashlib
from typing import Any

from nova_torrent_images.glance.image import ImageInfo, parse_image


def image_record(data: bytes = b"", image_id: str = "img-1", **fields: Any) -> dict[str, Any]:
    """The record Glance shows for ``data``; ``fields`` override, a ``None`` removes one."""
    record: dict[str, Any] = {
        "id": image_id,
        "status": "active",
        "size": len(data),
        "disk_format": "raw",
        "os_hash_algo": "sha512",
        "os_hash_value": hashlib.sha512(data).hexdigest(),
    }
    record.update(fields)
    return {key: value for key, value in record.items() if value is not None}


def image_info(data: bytes = b"", image_id: str = "img-1", **fields: Any) -> ImageInfo:
    """:func:`image_record` parsed as the library parses Glance's answer."""
    return parse_image(image_record(data, image_id, **fields))
