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

"""Popularity promotion: publish an image automatically once it is requested often.

An image requested ``promotion_threshold`` times (default 10) within ``promotion_window``
minutes (default 10) is published (:meth:`Publisher.publish`: torrent, registry, whitelist,
``torrent_magnet`` and ``is_torrentable=true``). Off by default (``promotion_enabled``).

Where the count comes from (``promotion_source``, one source only, so nothing is counted
twice):

``notifications`` (default, the one to use with more than one node)
    Glance emits an ``image.send`` notification for every image download it serves
    (priority INFO when the whole image was sent). The origin seeder listens for them on
    the message bus (:class:`ImageSendEndpoint`, started by ``nova-torrent-images seed``)
    and counts them where publishing happens. Every plain-HTTP download by any compute
    host is seen, which is exactly the load promotion is meant to take off Glance.
    Configuration, in glance-api.conf::

        [oslo_messaging_notifications]
        driver = messagingv2
        transport_url = rabbit://...
        # and image.send must not be in [DEFAULT] disabled_notifications

    and in the seeder's nova-torrent-images.conf::

        [DEFAULT]
        transport_url = rabbit://...          # the same bus
        [torrent_images]
        promotion_enabled = true
        promotion_source = notifications
        # promotion_notification_topics = notifications, promotion_notification_exchange =
        # glance and promotion_notification_pool = nova-torrent-images-<host> by default

``handler``
    The image handler calls :func:`nova_torrent_images.virt.xenapi.handler.record_request` for each
    image it is asked for (with any other source that module imports nothing of the
    origin, so nova-compute does not load the publisher); the count lives in
    ``origin_state_dir`` of that process and the publish runs there (in a background
    thread, never delaying the boot). That process therefore needs the
    origin's registry and Glance credentials that may update image properties: it fits
    all-in-one and edge sites where nova-compute and the origin seeder share a host. On
    other hosts leave the source at ``notifications``; the hook is then a no-op.

Both count with :class:`nova_torrent_images.common.popularity.RequestCounter`, one sliding window
in ``<origin_state_dir>/promotion/requests.json`` shared by threads, processes and
restarts.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from oslo_config import cfg
from oslo_log import log as logging

from nova_torrent_images import exception
from nova_torrent_images.common.popularity import Clock, RequestCounter
from nova_torrent_images.origin.publisher import Publisher, PublishResult
from nova_torrent_images.origin.registry import Registry, validate_image_id

LOG = logging.getLogger(__name__)


@dataclass
class Promotion:
    """What one counted request led to."""

    image_id: str
    count: int
    promoted: bool = False  # the threshold was reached and publishing started or ran
    result: PublishResult | None = None
    error: str | None = None


class Promoter:
    """Counts requests and publishes an image when it becomes popular."""

    def __init__(
        self,
        conf: cfg.ConfigOpts,
        publisher: Publisher | None = None,
        *,
        publisher_factory: Callable[[], Publisher] | None = None,
        counter: RequestCounter | None = None,
        clock: Clock = time.time,
        background: bool = False,
    ) -> None:
        """``publisher``, or ``publisher_factory`` to build one on the first promotion
        (a process that only counts never needs Glance credentials)."""
        if publisher is None and publisher_factory is None:
            raise ValueError("a publisher or a publisher_factory is needed")
        self.opts = conf.torrent_images
        self._publisher = publisher
        self._publisher_factory = publisher_factory
        self.registry = (
            publisher.registry
            if publisher is not None
            else Registry(self.opts.origin_state_dir, self.opts.origin_data_dir)
        )
        self.counter = counter or RequestCounter(
            self.opts.origin_state_dir, self.opts.promotion_window * 60, clock=clock
        )
        self.background = background
        self._lock = threading.Lock()
        self._publishing: set[str] = set()

    @property
    def publisher(self) -> Publisher:
        if self._publisher is None:
            self._publisher = self._publisher_factory()
        return self._publisher

    def record_request(self, image_id: str) -> Promotion:
        """Count one request of ``image_id``; publish it when it reached the threshold.

        Never raises: a failed count or publish is logged and must not disturb the boot
        or the notification listener that reported the request.
        """
        try:
            validate_image_id(image_id)
            if self.registry.get(image_id) is not None:
                return Promotion(image_id, 0)  # published already: nothing to count
            threshold = self.opts.promotion_threshold
            count, crossed = self.counter.record(image_id, threshold)
        except exception.NotPublishable as exc:
            LOG.warning("Request not counted for promotion: %s", exc)
            return Promotion(image_id, 0, error=str(exc))
        except Exception as exc:  # noqa: BLE001  see the docstring
            LOG.exception("Counting a request of image %s for promotion failed", image_id)
            return Promotion(image_id, 0, error=str(exc))
        if not crossed:
            LOG.debug(
                "Image %s: %d of %d requests within %d minutes",
                image_id,
                count,
                threshold,
                self.opts.promotion_window,
            )
            return Promotion(image_id, count)
        LOG.info(
            "Image %s was requested %d times within %d minutes "
            "([torrent_images] promotion_threshold, promotion_window): publishing it",
            image_id,
            count,
            self.opts.promotion_window,
        )
        if self.background:
            with self._lock:
                if image_id in self._publishing:
                    return Promotion(image_id, count, promoted=True)
                self._publishing.add(image_id)
            threading.Thread(
                target=self._publish,
                args=(image_id, count),
                name=f"promote-{image_id}",
                daemon=True,
            ).start()
            return Promotion(image_id, count, promoted=True)
        return self._publish(image_id, count)

    def _publish(self, image_id: str, count: int) -> Promotion:
        try:
            result = self.publisher.publish(image_id)
            return Promotion(image_id, count, promoted=True, result=result)
        except exception.TorrentImagesError as exc:
            LOG.warning("Image %s is popular but could not be published: %s", image_id, exc)
            return Promotion(image_id, count, promoted=True, error=str(exc))
        except Exception as exc:  # noqa: BLE001  see record_request
            LOG.exception("Image %s is popular but publishing it failed unexpectedly", image_id)
            return Promotion(image_id, count, promoted=True, error=str(exc))
        finally:
            with self._lock:
                self._publishing.discard(image_id)


class ImageSendEndpoint:
    """oslo.messaging notification endpoint: counts Glance's ``image.send`` events.

    Glance sends ``image.send`` at INFO priority when a download completed (and at ERROR
    when it was cut short, which is not counted). The payload looks like
    ``{"bytes_sent": 134217728, "image_id": "...", "owner_id": "...",
    "receiver_tenant_id": "...", "receiver_user_id": "..."}``.
    """

    def __init__(self, promoter: Promoter) -> None:
        import oslo_messaging

        self.promoter = promoter
        self.filter_rule = oslo_messaging.NotificationFilter(event_type=r"^image\.send$")
        self._handled = oslo_messaging.NotificationResult.HANDLED

    def info(
        self,
        ctxt: dict[str, Any],
        publisher_id: str,
        event_type: str,
        payload: dict[str, Any],
        metadata: dict[str, Any],
    ) -> str | None:
        if event_type != "image.send":
            return None
        image_id = payload.get("image_id") if isinstance(payload, dict) else None
        if not image_id:
            LOG.warning("image.send notification from %s without an image_id", publisher_id)
            return self._handled
        self.promoter.record_request(str(image_id))
        return self._handled


def default_pool_name() -> str:
    return f"nova-torrent-images-{socket.gethostname()}"


class NotificationListener:
    """The origin seeder's one oslo.messaging listener and the work queue behind it."""

    def __init__(self, listener: Any, jobs: Any = None) -> None:
        self.listener = listener
        self.jobs = jobs  # activation.PublishQueue, when publishing on activation

    def stop(self) -> None:
        """Stop receiving, then stop the publish queue (running jobs get a few seconds)."""
        try:
            self.listener.stop()
        finally:
            if self.jobs is not None:
                self.jobs.stop()

    def wait(self) -> None:
        self.listener.wait()


def start_notification_listener(
    conf: cfg.ConfigOpts,
    publisher: Publisher | None,
    *,
    promote: bool | None = None,
    activate: bool | None = None,
    transport: Any = None,
) -> NotificationListener:
    """Start the origin seeder's notification listener; return it running.

    One listener on ``promotion_notification_topics``, ``promotion_notification_exchange``
    and ``promotion_notification_pool`` for both of its jobs: counting Glance's
    ``image.send`` for promotion (``promote``; default: ``promotion_enabled`` with
    ``promotion_source = notifications``) and publishing on ``image.activate`` /
    unpublishing on ``image.delete`` (``activate``; default: ``origin_publish_on_activate``,
    :mod:`.activation`). ``transport``: an oslo.messaging notification transport (tests);
    default the one ``[DEFAULT] transport_url`` or ``[oslo_messaging_notifications]`` names.
    """
    opts = conf.torrent_images
    if promote is None:
        promote = bool(opts.promotion_enabled and opts.promotion_source == "notifications")
    if activate is None:
        activate = bool(opts.origin_publish_on_activate)
    option = "promotion_source" if promote else "origin_publish_on_activate"
    if not (promote or activate):
        raise exception.ConfigError(option=option, reason="the listener would have no job")
    if publisher is None:
        raise exception.ConfigError(
            option=option,
            reason="acting on notifications needs a Glance client to publish with",
        )
    try:
        import oslo_messaging
    except ImportError as exc:
        raise exception.ConfigError(
            option=option,
            reason=f"notifications need oslo.messaging installed ({exc})",
        ) from exc
    if transport is None:
        try:
            transport = oslo_messaging.get_notification_transport(conf)
        except oslo_messaging.MessagingException as exc:
            raise exception.ConfigError(
                option=option,
                reason=f"no usable message bus for notifications ([DEFAULT] transport_url): {exc}",
            ) from exc
    targets = [
        oslo_messaging.Target(topic=topic, exchange=opts.promotion_notification_exchange)
        for topic in opts.promotion_notification_topics
    ]
    pool = opts.promotion_notification_pool or default_pool_name()
    endpoints: list[Any] = []
    jobs = None
    if promote:
        endpoints.append(ImageSendEndpoint(Promoter(conf, publisher)))
    if activate:
        from nova_torrent_images.origin import activation

        jobs = activation.PublishQueue(publisher, workers=opts.origin_publish_workers).start()
        endpoints.append(activation.ActivationEndpoint(jobs, opts.torrentable_property))
    try:
        listener = oslo_messaging.get_notification_listener(
            transport, targets, endpoints, executor="threading", pool=pool
        )
        listener.start()
    except BaseException:
        if jobs is not None:
            jobs.stop()
        raise
    jobs_said = []
    if promote:
        jobs_said.append(
            f"image.send for promotion ({opts.promotion_threshold} requests within "
            f"{opts.promotion_window} minutes publish an image)"
        )
    if activate:
        jobs_said.append(
            "image.activate and image.delete to publish and unpublish "
            f"({opts.origin_publish_workers} publishing at a time)"
        )
    LOG.info(
        "Listening to Glance notifications on %s (exchange %s, pool %s): %s",
        ", ".join(opts.promotion_notification_topics),
        opts.promotion_notification_exchange,
        pool,
        "; ".join(jobs_said),
    )
    return NotificationListener(listener, jobs)


_PROMOTERS: dict[int, tuple[cfg.ConfigOpts, Promoter]] = {}
_PROMOTERS_LOCK = threading.Lock()


def handler_promoter(conf: cfg.ConfigOpts) -> Promoter:
    """The one background :class:`Promoter` of ``conf`` for the image handler's requests.

    Called by :func:`nova_torrent_images.virt.xenapi.handler.record_request` once it knows the
    handler counts (``promotion_source = handler``); the publisher is built on the first
    promotion, so a process that only counts never needs Glance credentials.
    """
    with _PROMOTERS_LOCK:
        known = _PROMOTERS.get(id(conf))
        if known is None or known[0] is not conf:
            promoter = Promoter(
                conf, publisher_factory=lambda: Publisher.from_conf(conf), background=True
            )
            _PROMOTERS[id(conf)] = (conf, promoter)
            return promoter
        return known[1]
