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

"""Publish on activation: an image is published when Glance activates it, unpublished
when Glance deletes it (``[torrent_images] origin_publish_on_activate``).

The origin seeder's notification listener (the one promotion uses, started by
:func:`nova_torrent_images.origin.promotion.start_notification_listener`, same topics,
exchange and pool) hands ``image.activate`` and ``image.delete`` to
:class:`ActivationEndpoint`. The endpoint only looks at the payload and queues the work
(:class:`PublishQueue`): a publish reads the whole image from Glance, and the listener's
threads must stay free for the next notification.

The queue is bounded in both ways that matter:

* ``origin_publish_workers`` threads publish (each reads one image at a time);
* one image is worked on by one thread at a time, and its events coalesce: an
  ``image.delete`` that arrives while its ``image.activate`` still waits replaces it, one
  that arrives while the publish runs is done right after it. At most
  :data:`MAX_PENDING` images wait; beyond that an event is dropped with a warning (the
  operator can run ``nova-torrent-images publish`` later; the periodic check unpublishes
  deleted images anyway).

Glance sends ``image.activate`` from the upload request before it saved the image as
active, so a publish first waits (a few seconds at most, :data:`ACTIVE_WAIT`) for the
record to say ``active``. Images that cannot be published (not raw, no hash, deleted
meanwhile, ``is_torrentable=false`` set by their owner) are logged at INFO and skipped.

Every origin node has a listener pool of its own by default, so every node publishes
every activated image. They produce the same torrent (swarm/torrent.make_torrent is
deterministic: no creation date) and the same properties when their settings agree; the
second node finds Glance up to date and changes nothing.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from typing import Any

from oslo_log import log as logging
from oslo_utils import strutils

from nova_torrent_images import exception
from nova_torrent_images.origin.publisher import PUBLISHABLE_DISK_FORMATS, Publisher
from nova_torrent_images.origin.registry import validate_image_id

LOG = logging.getLogger(__name__)

PUBLISH = "publish"
UNPUBLISH = "unpublish"
EVENTS = {"image.activate": PUBLISH, "image.delete": UNPUBLISH}
MAX_PENDING = 1024  # images waiting for a worker; more events are dropped (logged)
ACTIVE_WAIT = 30.0  # seconds a publish waits for Glance to record the image as active
ACTIVE_POLL = 1.0
STOP_WAIT = 5.0  # seconds stop() waits for running work (a publish may take far longer)
SETTING = "origin_publish_on_activate"


class PublishQueue:
    """Publishes and unpublishes images on a few threads, one job per image at a time."""

    def __init__(
        self,
        publisher: Publisher,
        *,
        workers: int = 1,
        max_pending: int = MAX_PENDING,
        active_wait: float = ACTIVE_WAIT,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.publisher = publisher
        self.max_pending = max_pending
        self.active_wait = active_wait
        self._sleep = sleep
        self._cond = threading.Condition()
        self._pending: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._running: dict[str, str | None] = {}  # image -> what arrived meanwhile
        self._stopping = False
        self._threads = [
            threading.Thread(target=self._work, name=f"origin-activation-{i}", daemon=True)
            for i in range(max(1, workers))
        ]
        self.done: list[tuple[str, str, str]] = []  # (image, action, outcome), the last 100

    def start(self) -> PublishQueue:
        for thread in self._threads:
            thread.start()
        return self

    def submit(self, image_id: str, action: str) -> bool:
        """Queue ``action`` for ``image_id``; False when it was dropped (logged)."""
        with self._cond:
            if self._stopping:
                return False
            if image_id in self._running:
                self._running[image_id] = action  # done right after the current job
                return True
            if image_id not in self._pending and len(self._pending) >= self.max_pending:
                LOG.warning(
                    "Image %s: %s on %s dropped: %d images wait already "
                    "([torrent_images] %s, origin_publish_workers); run "
                    "'nova-torrent-images %s %s' later",
                    image_id,
                    action,
                    "activation" if action == PUBLISH else "deletion",
                    len(self._pending),
                    SETTING,
                    action,
                    image_id,
                )
                return False
            self._pending[image_id] = action  # a later event replaces an earlier one
            self._cond.notify()
            return True

    def idle(self) -> bool:
        with self._cond:
            return not self._pending and not self._running

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is queued or running (tests); False on time-out."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending or self._running:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.1))
            return True

    def stop(self, timeout: float = STOP_WAIT) -> None:
        """Stop taking work; what waits is dropped (logged), running jobs get ``timeout``."""
        with self._cond:
            self._stopping = True
            dropped = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        if dropped:
            LOG.warning(
                "Origin seeder stopping: %d queued publishes or unpublishes not done: %s",
                len(dropped),
                ", ".join(dropped),
            )
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            if thread.is_alive() and thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))

    # -- the workers -----------------------------------------------------------------
    def _take(self) -> tuple[str, str] | None:
        with self._cond:
            while not self._stopping:
                if self._pending:
                    image_id, action = self._pending.popitem(last=False)
                    self._running[image_id] = None
                    return image_id, action
                self._cond.wait()
            return None

    def _work(self) -> None:
        while (job := self._take()) is not None:
            image_id, action = job
            while True:
                outcome = self._run(image_id, action)
                with self._cond:
                    self.done = [*self.done[-99:], (image_id, action, outcome)]
                    follow = self._running.get(image_id)
                    if follow is None or self._stopping:
                        del self._running[image_id]
                        self._cond.notify_all()
                        break
                    self._running[image_id] = None
                action = follow

    def _run(self, image_id: str, action: str) -> str:
        """Do one job; never raises (a worker thread must outlive one bad image)."""
        try:
            if action == PUBLISH:
                return self._publish(image_id)
            result = self.publisher.unpublish(
                image_id, reason="Glance deleted it (image.delete)", update_glance=False
            )
            return "unpublished" if result.was_published else "not published"
        except (exception.NotPublishable, exception.InvalidImageMetadata) as exc:
            # Not raw, not active, no size or hash: nothing an operator must fix here.
            LOG.info("Image %s activated in Glance, not published: %s", image_id, exc)
            return "skipped"
        except exception.ImageNotFound:
            LOG.info("Image %s activated in Glance but deleted since; not published", image_id)
            return "skipped"
        except exception.TorrentImagesError as exc:
            LOG.warning(
                "Image %s: %s after its %s failed ([torrent_images] %s): %s",
                image_id,
                action,
                "activation" if action == PUBLISH else "deletion",
                SETTING,
                exc,
            )
            return f"failed: {exc}"
        except Exception as exc:  # noqa: BLE001  logged with its traceback; the next job runs
            LOG.exception(
                "Image %s: %s after its %s failed unexpectedly ([torrent_images] %s)",
                image_id,
                action,
                "activation" if action == PUBLISH else "deletion",
                SETTING,
            )
            return f"failed: {exc!r}"

    def _publish(self, image_id: str) -> str:
        deadline = time.monotonic() + self.active_wait
        while True:
            record = self.publisher.glance.get_image(image_id)
            status = record.get("status")
            if status == "active" or status not in ("queued", "saving", "importing"):
                break  # a status that will not become active is publish's to refuse
            if time.monotonic() >= deadline:
                raise exception.NotPublishable(
                    image_id=image_id,
                    reason=f"Glance still says {status} {self.active_wait:.0f} s after "
                    "image.activate",
                )
            self._sleep(ACTIVE_POLL)
        refused = _owner_refuses(record, self.publisher.opts.torrentable_property)
        if refused:
            LOG.info("Image %s activated in Glance, not published: %s", image_id, refused)
            return "skipped"
        result = self.publisher.publish(image_id)
        LOG.info("Image %s activated in Glance: %s (%s)", image_id, result.status, result.magnet)
        return result.status


def _owner_refuses(record: dict[str, Any], torrentable_property: str) -> str | None:
    """Why the image's own properties say it must not be published, or None."""
    raw = record.get(torrentable_property)
    if raw is None:
        return None
    try:
        wanted = strutils.bool_from_string(raw, strict=True)
    except ValueError:
        return f"its {torrentable_property} property is {str(raw)[:40]!r}, not true or false"
    return None if wanted else f"its {torrentable_property} property is false"


class ActivationEndpoint:
    """oslo.messaging notification endpoint for ``image.activate`` and ``image.delete``.

    The payload is Glance's image (``id``, ``status``, ``disk_format``, ``properties``,
    ...). Only the payload is read here; the Glance record is read by the worker.
    """

    def __init__(self, jobs: PublishQueue, torrentable_property: str = "is_torrentable") -> None:
        import oslo_messaging

        self.jobs = jobs
        self.torrentable_property = torrentable_property
        self.filter_rule = oslo_messaging.NotificationFilter(
            event_type=r"^image\.(activate|delete)$"
        )
        self._handled = oslo_messaging.NotificationResult.HANDLED

    def info(
        self,
        ctxt: dict[str, Any],
        publisher_id: str,
        event_type: str,
        payload: dict[str, Any],
        metadata: dict[str, Any],
    ) -> str | None:
        action = EVENTS.get(event_type)
        if action is None:
            return None
        try:
            image_id = validate_image_id(str(payload.get("id") or ""))
        except (AttributeError, exception.NotPublishable):
            LOG.warning(
                "%s notification from %s without a usable image id; ignored",
                event_type,
                publisher_id,
            )
            return self._handled
        if action == PUBLISH:
            skip = self._not_publishable(payload)
            if skip:
                LOG.info("Image %s activated in Glance, not published: %s", image_id, skip)
                return self._handled
        self.jobs.submit(image_id, action)
        return self._handled

    def _not_publishable(self, payload: dict[str, Any]) -> str | None:
        """What the payload alone shows against publishing (the publish checks the rest)."""
        disk_format = payload.get("disk_format")
        if disk_format is not None and disk_format not in PUBLISHABLE_DISK_FORMATS:
            return f"its disk format is {disk_format}; only raw images are published"
        properties = payload.get("properties")
        if isinstance(properties, dict):
            return _owner_refuses(properties, self.torrentable_property)
        return None
