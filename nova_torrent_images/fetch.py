"""Fetch an image into a destination: by torrent when policy says so, else from Glance.

This is the core action every integration (XenAPI store, libvirt image cache, the CLI)
stands on. Whatever the swarm does, the caller gets either verified bytes at
``destination`` or an exception, never a wrong file: any swarm failure removes the partial
data and, when ``[torrent_images] fallback_to_glance`` is on, streams the image from Glance
with hash verification into the same destination.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from oslo_config import cfg
from oslo_log import log as logging

from nova_torrent_images import exception, policy, verify
from nova_torrent_images.glance import GlanceClient
from nova_torrent_images.image import ImageInfo
from nova_torrent_images.swarm.engine import SwarmEngine, get_engine
from nova_torrent_images.swarm.transfer import ProgressCallback, SwarmStats, Transfer

LOG = logging.getLogger(__name__)


@dataclass
class FetchResult:
    """How an image reached its destination."""

    image_id: str
    destination: str
    source: str  # "torrent" or "glance"
    seconds: float
    bytes_from_peers: int = 0
    bytes_from_origin: int = 0
    bytes_from_glance: int = 0
    fallback_reason: str | None = None
    swarm: SwarmStats | None = None


def fetch(
    image: ImageInfo,
    destination: str,
    *,
    conf: cfg.ConfigOpts,
    glance: GlanceClient | None,
    engine: SwarmEngine | None = None,
    disk_formats: tuple[str, ...] | None = None,
    progress: ProgressCallback | None = None,
) -> FetchResult:
    """Put the verified bytes of ``image`` at ``destination``.

    ``destination`` is a path that does not exist yet (it is created) or an existing block
    device. Raises :class:`~nova_torrent_images.exception.FetchFailed` when neither the
    swarm nor Glance delivered a verified image.
    """
    destination = os.path.abspath(destination)
    if os.path.lexists(destination) and not verify.is_block_device(destination):
        raise exception.StoreError(
            reason=f"destination {destination} of image {image.id} already exists; "
            "refusing to overwrite it"
        )
    opts = conf.torrent_images
    start = time.monotonic()
    decision = policy.decide(image, conf, disk_formats=disk_formats)
    if image.torrent_error is not None:
        LOG.warning("%s; the image is fetched from Glance", image.torrent_error)

    fallback_reason = None
    if decision:
        try:
            return _fetch_by_torrent(image, destination, conf, engine, start, progress)
        except exception.TorrentImagesError as exc:
            fallback_reason = str(exc)
            LOG.warning("Image %s: swarm download failed, partial data removed: %s", image.id, exc)
        except Exception as exc:  # noqa: BLE001  libtorrent raises bare RuntimeErrors
            fallback_reason = f"unexpected {type(exc).__name__}: {exc}"
            LOG.exception("Image %s: swarm download failed unexpectedly", image.id)
        verify.discard(destination)
        if not opts.fallback_to_glance:
            raise exception.FetchFailed(
                image_id=image.id,
                reason=f"{fallback_reason}; [torrent_images] fallback_to_glance is off",
            )
        LOG.info("Image %s: falling back to a verified Glance download", image.id)
    else:
        LOG.info("Image %s: plain Glance download: %s", image.id, decision.reason)

    if glance is None:
        raise exception.FetchFailed(
            image_id=image.id,
            reason=(fallback_reason or decision.reason) + "; no Glance client to fall back to",
        )
    written = glance.download(image, destination, verify_hash=opts.verify_image_hash)
    return FetchResult(
        image_id=image.id,
        destination=destination,
        source="glance",
        seconds=time.monotonic() - start,
        bytes_from_glance=written,
        fallback_reason=fallback_reason,
    )


def _fetch_by_torrent(
    image: ImageInfo,
    destination: str,
    conf: cfg.ConfigOpts,
    engine: SwarmEngine | None,
    start: float,
    progress: ProgressCallback | None,
) -> FetchResult:
    engine = engine or get_engine(conf)
    stats = Transfer(engine, image, destination, conf, progress).run()
    if conf.torrent_images.verify_image_hash:
        verify.verify_file(image, destination)
    seconds = time.monotonic() - start
    LOG.info(
        "Image %s: %d MiB from the swarm in %.1fs (%d MiB from peers, %d MiB from "
        "origin seeders, %d peers, %d failed pieces)%s",
        image.id,
        image.size >> 20,
        seconds,
        stats.bytes_from_peers >> 20,
        stats.bytes_from_origin >> 20,
        stats.peers_seen,
        stats.hash_failures,
        ", verified" if conf.torrent_images.verify_image_hash else "",
    )
    return FetchResult(
        image_id=image.id,
        destination=destination,
        source="torrent",
        seconds=seconds,
        bytes_from_peers=stats.bytes_from_peers,
        bytes_from_origin=stats.bytes_from_origin,
        swarm=stats,
    )
