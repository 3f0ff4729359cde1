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

"""Stand-ins shared by the origin tests: an in-memory Glance, a recording publisher, a clock."""

from __future__ import annotations

import hashlib
import os

from nova_torrent_images import exception
from nova_torrent_images.origin.publisher import Publisher, PublishResult
from nova_torrent_images.origin.registry import Registry
from nova_torrent_images.testing.swarm import make_conf

IMAGE_ID = "7b4c2b36-5e0f-4d61-9d4f-0e6f3f6a2c11"
OTHER_ID = "0b1c2d3e-0000-4000-8000-000000000001"


class FakeGlance:
    """The few GlanceClient calls the publisher makes, with call counts."""

    def __init__(self) -> None:
        self.records: dict[str, dict] = {}
        self.data: dict[str, bytes] = {}
        self.updates: list[tuple[str, dict]] = []
        self.removals: list[tuple[str, list]] = []
        self.downloads = 0
        self.fail_updates = False
        self.fail_gets = False

    def add(self, image_id: str = IMAGE_ID, size: int = 600_000, **fields) -> dict:
        data = os.urandom(size or 0)
        record = {
            "id": image_id,
            "name": "cirros",
            "status": "active",
            "size": size,
            "disk_format": "raw",
            "container_format": "bare",
            "os_hash_algo": "sha512",
            "os_hash_value": hashlib.sha512(data).hexdigest(),
            "checksum": hashlib.md5(data).hexdigest(),  # noqa: S324  Glance's legacy checksum
            "updated_at": "2026-01-01T00:00:00Z",
        }
        record.update(fields)
        self.records[image_id], self.data[image_id] = record, data
        return record

    def get_image(self, image_id: str) -> dict:
        if self.fail_gets:
            raise exception.GlanceError(image_id=image_id, reason="503 Service Unavailable")
        if image_id not in self.records:
            raise exception.ImageNotFound(image_id=image_id)
        return dict(self.records[image_id])

    def set_properties(self, image_id: str, **props: str) -> None:
        if self.fail_updates:
            raise exception.GlanceError(image_id=image_id, reason="409 Conflict")
        self.updates.append((image_id, props))
        self.records[image_id].update(props)
        self.records[image_id]["updated_at"] = f"2026-01-01T00:00:{len(self.updates):02d}Z"

    def remove_properties(self, image_id: str, names) -> None:
        self.removals.append((image_id, list(names)))
        for name in names:
            self.records[image_id].pop(name, None)

    def download(self, image, destination, *, verify_hash=True, preallocated=False) -> int:
        self.downloads += 1
        with open(destination, "wb") as f:
            f.write(self.data[image.id])
        return image.size


class FakePublisher:
    """Records publishes; registers them in the registry like the real one."""

    def __init__(self, registry: Registry, fail: Exception | None = None) -> None:
        self.registry = registry
        self.published: list[str] = []
        self.fail = fail

    def publish(self, image_id: str) -> PublishResult:
        if self.fail is not None:
            raise self.fail
        self.published.append(image_id)
        return PublishResult(image_id, "published", "magnet:?", None, "0" * 64, 1, 0.0)


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def publish_one(state_dir: str, size: int) -> tuple:
    """One image of ``size`` bytes published by a real Publisher from a FakeGlance:
    (registry, its entry, the image's bytes)."""
    glance = FakeGlance()
    glance.add(size=size)
    conf = make_conf(origin_state_dir=state_dir, origin_advertise_addresses=["10.0.0.2:6881"])
    publisher = Publisher(conf, glance)
    publisher.publish(IMAGE_ID)
    return publisher.registry, publisher.registry.get(IMAGE_ID), glance.data[IMAGE_ID]
